"""A Hugging Face Qwen2 folder as a speculative draft (bagel_jax.inference.draft_lm), written by transformers.

Covers: the loader gives transformers' logits through the draft's own cached prefill and steps (float32);
greedy speculative decoding with it equals plain greedy (fixed and adaptive gamma); a draft whose embedding
table misses a target token, or whose tokenizer maps a token elsewhere, or whose folder lacks a tensor, is
refused with a message naming it.
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bagel_jax.config import LLMConfig  # noqa: E402
from bagel_jax.convert.safetensors_io import load_file, save_file  # noqa: E402
from bagel_jax.inference.decode import generate_text  # noqa: E402
from bagel_jax.inference.draft_lm import DraftError, check_vocab, load_qwen2_draft  # noqa: E402
from bagel_jax.inference.speculative import AdaptiveGamma, speculative_generate  # noqa: E402
from test_qwen2_dense import hf_qwen2  # noqa: E402
from test_speculative import PROMPTS, _ctx, _engine  # noqa: E402

L = 12


def write_hf_qwen2(folder, vocab, tiny_a):
    """A random tiny HF Qwen2 (tied embeddings, non-trivial norms and biases) saved with its tokenizer files."""
    model = hf_qwen2(LLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=48, vocab_size=vocab, rope_theta=10000.0, tie_word_embeddings=True,
                               max_position_embeddings=512, qk_norm=False, layer_module="Qwen2DecoderLayer"))
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        if os.path.isfile(os.path.join(tiny_a, f)):
            shutil.copy(os.path.join(tiny_a, f), folder)
    return model


@pytest.fixture(scope="module")
def target(tiny_a):
    return _engine(tiny_a, 64, 1)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tiny_a):
    folder = str(tmp_path_factory.mktemp("hf_draft"))
    return folder, write_hf_qwen2(folder, 600, tiny_a)


def test_draft_logits_equal_transformers(target, hf_folder):
    folder, hf = hf_folder
    draft = load_qwen2_draft(folder)
    assert draft.cfg.tie_word_embeddings and draft.cfg.vocab_size == 600
    ctx = _ctx(target, PROMPTS[:1])
    draft = draft.bind(ctx).reserve(8)
    assert draft.out_vocab == 576                                  # cut to the target's vocabulary
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 500, 11)]
    P = 7
    state = draft.init(ctx, [ids[:P]], 2)                          # cached prefill of the prompt
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()[0]            # [11, 600]
    cache = state["cache"]
    for j in range(P - 1, len(ids)):                               # the prefill's last token, then steps
        if j == P - 1:
            cache = cache.replace(length=cache.length - 1)         # re-feed token P-1 through the step path
        logits, cache = draft.step(state, cache, jnp.asarray([ids[j]]), jnp.asarray([j]))
        want = ref[j, :576]
        err = np.abs(np.asarray(logits[0]) - want).max()
        assert err <= 1e-4 * max(1.0, np.abs(want).max()), (j, err)


def test_hf_draft_greedy_equals_plain(target, hf_folder):
    folder, _ = hf_folder
    draft = load_qwen2_draft(folder)
    ctx = _ctx(target, PROMPTS)
    stops = [target.sp.eos, -1]
    plain = generate_text(ctx, L, stop_tokens=stops)
    for gamma in (3, AdaptiveGamma((1, 2, 4), start=2)):
        spec = speculative_generate(ctx, draft, gamma, L, stop_tokens=stops)
        assert [list(x) for x in spec.token_ids] == [list(x) for x in plain.token_ids]
        assert spec.stop == plain.stop and spec.texts == plain.texts
        assert int(spec.raw["rounds"]) == int(np.sum(spec.raw["bucket_rounds"]))


def test_vocabulary_refused(target, tmp_path, tiny_a):
    folder = str(tmp_path / "small_vocab")
    write_hf_qwen2(folder, 515, tiny_a)      # rows 0..514: the target's <|vision_start|> (515) is missing
    draft = load_qwen2_draft(folder)
    ctx = _ctx(target, PROMPTS)
    with pytest.raises(DraftError, match=r"token '<\|vision_start\|>' \(id 515\) is outside the draft's embedding "
                                         r"table of 515 rows"):
        speculative_generate(ctx, draft, 2, L)
    vocab = dict(target.tok.hf.get_vocab())
    check_vocab(600, vocab, vocab, "same")                         # same tokenizer: fine
    extra = {k: v for k, v in vocab.items() if k != "<|vision_end|>"}
    check_vocab(600, extra, vocab, "unknown token")                # a token the draft lacks maps to itself
    moved = dict(vocab, **{"<|vision_end|>": 3})
    with pytest.raises(DraftError, match=r"maps '<\|vision_end\|>' to id 3, the target's to 516"):
        check_vocab(600, moved, vocab, "moved")


def test_missing_tensor_refused(hf_folder, tmp_path):
    folder, _ = hf_folder
    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    t = load_file(os.path.join(bad, "model.safetensors"))
    t.pop("model.layers.1.mlp.up_proj.weight")
    save_file(t, os.path.join(bad, "model.safetensors"))
    with pytest.raises(DraftError, match="missing .'model.layers.1.mlp.up_proj.weight'"):
        load_qwen2_draft(bad)
    with pytest.raises(DraftError, match="not found"):
        load_qwen2_draft(str(tmp_path / "nowhere"))
