"""Independent cross-check: our decoder in dense mode vs transformers' Qwen2ForCausalLM.

Random tiny Qwen2; its HF state dict goes through OUR key map and converter (the HF Qwen2 names are
exactly the official ``language_model.`` names without the prefix).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from bagel_jax.config import LLMConfig  # noqa: E402
from bagel_jax.convert import keymap  # noqa: E402
from bagel_jax.models.qwen2_mot import Qwen2MoT, Routing, key_map  # noqa: E402
from bagel_jax.nn.attention import MaskVectors  # noqa: E402


def hf_qwen2(cfg: LLMConfig):
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        attn_implementation="eager", torch_dtype=torch.float32)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():   # non-trivial norms and biases so a swapped tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_dense_qwen2_matches_transformers(tie):
    cfg = LLMConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=101, rope_theta=10000.0, tie_word_embeddings=tie,
                    qk_norm=False, layer_module="Qwen2DecoderLayer")
    hf = hf_qwen2(cfg)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    entries = key_map(cfg)
    assert {e.official for e in entries} == set(sd)
    params = keymap.tensors_to_params(entries, sd)

    L = 17
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, L))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()[0]

    m = Qwen2MoT(cfg)
    pos = jnp.arange(L)[None]
    vec = MaskVectors(jnp.ones((1, L), jnp.int32), pos, jnp.zeros((1, L), jnp.int32))
    x = m.apply({"params": params}, jnp.asarray(ids), method=Qwen2MoT.embed)
    h, _ = m.apply({"params": params}, x, pos, vec, Routing.und())
    ours = np.asarray(m.apply({"params": params}, h, method=Qwen2MoT.logits))[0]
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err
