"""Tokenizer: the Qwen2 byte-level BPE of a model folder, plus BAGEL's special-token ids
(docs/architecture.md#special-tokens)."""

from __future__ import annotations

import os
from typing import Sequence

from .layout import SpecialTokens

SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Thin wrapper: ``encode`` adds no special tokens; ids of the four BAGEL tokens in ``special``."""

    def __init__(self, hf_tokenizer, source: str = "<tokenizer>"):
        self.hf = hf_tokenizer
        self.source = source
        ids = {}
        vocab = hf_tokenizer.get_vocab()
        for role, tok in SPECIAL_TOKENS.items():
            if tok not in vocab:
                raise TokenizerError(f"{source}: tokenizer has no special token {tok} (needed as {role})")
            ids[role] = int(vocab[tok])
        self.special = SpecialTokens(**ids)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)


def load_tokenizer(folder: str) -> Tokenizer:
    """Load the folder's tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``)."""
    has_slow = all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
    has_fast = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    if not (has_slow or has_fast):
        raise TokenizerError(f"{folder}: missing tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    # transformers warns on import that PyTorch is absent; we only need its tokenizers
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise TokenizerError(f"{folder}: cannot load the tokenizer ({e})") from None
    return Tokenizer(hf, folder)
