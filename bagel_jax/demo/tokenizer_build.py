"""Train a tiny byte-level BPE tokenizer in the Qwen2 format (for tiny models trained on synthetic data).

The result is a folder with ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (plus the
files ``transformers`` writes beside them) that :func:`bagel_jax.tokenizer.load_tokenizer` loads like the
official Qwen2 tokenizer: same pre-tokenisation regex, byte-level alphabet, and the special tokens
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``.

Usage: ``python -m bagel_jax.demo.tokenizer_build --texts FILE --out DIR --vocab-size 560``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen2's pre-tokenisation regex (tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def build_tokenizer(texts: Iterable[str], out: str, vocab_size: int = 560) -> str:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens included, they come last)
    on ``texts`` and write it to ``out`` in the Qwen2 slow-tokenizer format. Returns ``out``."""
    n_special = len(SPECIAL)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE "
                         f"(needs at least {256 + n_special})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(out, exist_ok=True)
    tok.model.save(out)  # vocab.json + merges.txt

    # Special tokens follow the BPE vocabulary (as in Qwen2, where they sit after the merges).
    vocab_path = os.path.join(out, "vocab.json")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    base = len(vocab)
    added = {str(base + i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                 special=True) for i, t in enumerate(SPECIAL)}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train a tiny Qwen2-format byte-level BPE tokenizer.")
    ap.add_argument("--texts", required=True, help="text file, one training text per line")
    ap.add_argument("--out", required=True, help="output folder (vocab.json, merges.txt, tokenizer_config.json)")
    ap.add_argument("--vocab-size", type=int, default=560, help="total vocabulary incl. the 5 special tokens")
    a = ap.parse_args(argv)
    with open(a.texts, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    build_tokenizer(texts, a.out, a.vocab_size)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
