"""SigLIP NaViT encoder: key map, tiny-a fixture parity, packing, and a cross-check vs transformers."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.config import ViTConfig, config_from_folder
from bagel_jax.convert import keymap
from bagel_jax.images import patchify
from bagel_jax.models.siglip_navit import SiglipNavit, key_map
from bagel_jax.nn import intermediates
from bagel_jax.nn.options import REMAT_POLICIES, ModelOptions

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-a")
PREFIX = "vit_model.vision_model."
MAX_SIDE = 70  # vit_max_num_patch_per_side of tiny-a (and of BAGEL-7B-MoT)


def _need_fixture():
    if not os.path.isfile(os.path.join(FIXTURE, "ema.safetensors")):
        raise FileNotFoundError(f"tiny-a fixtures not found at {os.path.abspath(FIXTURE)} (part of the repository)")


def _vit_cfg() -> ViTConfig:
    return config_from_folder(FIXTURE).vit


def _tiny_a_params(cfg: ViTConfig):
    from safetensors.numpy import load_file
    ema = load_file(os.path.join(FIXTURE, "ema.safetensors"))
    tensors = {k[len(PREFIX):]: v for k, v in ema.items() if k.startswith(PREFIX)}
    return keymap.tensors_to_params(key_map(cfg), tensors)


def _err(ours, ref) -> tuple[float, float]:
    """(max abs error, allowed error = 1e-4 * max(1, max|ref|))."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref))), 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def _run(cfg, params, tokens, pos, seg):
    """Jitted forward with per-layer outputs (eager dispatch of the tiny model is slower than compiling)."""
    apply = jax.jit(lambda p, *a: intermediates.apply(SiglipNavit(cfg), {"params": p}, *a))
    return apply(params, jnp.asarray(tokens, jnp.float32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32))


# -------------------------------------------------------------------------------------------------
# Key map
# -------------------------------------------------------------------------------------------------

def test_key_map_matches_checkpoint_and_init_tree():
    _need_fixture()
    from safetensors import safe_open
    cfg = _vit_cfg()
    assert cfg.num_hidden_layers == 2  # vit_config.json says 3; the official loader uses one fewer
    entries = key_map(cfg)

    with safe_open(os.path.join(FIXTURE, "ema.safetensors"), framework="numpy") as f:
        ckpt = {k[len(PREFIX):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(PREFIX)}
    names = [e.official for e in entries]
    assert len(names) == len(set(names))
    assert set(names) == set(ckpt), (sorted(set(names) ^ set(ckpt)))

    model = SiglipNavit(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, cfg.patch_dim)),
                            jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    leaves = {tuple(k.key for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    groups = keymap.group_by_leaf(entries)
    assert set(groups) == set(leaves), sorted(set(groups) ^ set(leaves))
    for path, es in groups.items():
        shape = leaves[path]
        if es[0].layer is not None:
            assert shape[0] == cfg.num_hidden_layers, path
            shape = shape[1:]
        for e in es:
            assert keymap.official_shape(shape, e.transform) == ckpt[e.official], (e.official, shape)


# -------------------------------------------------------------------------------------------------
# Fixture parity
# -------------------------------------------------------------------------------------------------

def test_patchify_matches_fixture():
    _need_fixture()
    from safetensors.numpy import load_file
    d = load_file(os.path.join(FIXTURE, "vit.safetensors"))
    img = (d["image_uint8"].astype(np.float32) / 255.0 - 0.5) / 0.5
    tokens, pos = patchify(img.transpose(2, 0, 1), 14, MAX_SIDE)
    np.testing.assert_array_equal(pos, d["packed_vit_position_ids"])
    np.testing.assert_allclose(tokens, d["packed_vit_tokens"], atol=1e-6, rtol=0)


def test_encoder_matches_fixture():
    _need_fixture()
    from safetensors.numpy import load_file
    d = load_file(os.path.join(FIXTURE, "vit.safetensors"))
    cfg = _vit_cfg()
    tokens, pos = d["packed_vit_tokens"][None], d["packed_vit_position_ids"][None]
    out, hidden = _run(cfg, _tiny_a_params(cfg), tokens, pos, np.ones_like(pos))
    checks = {"vit_embeddings": hidden["vit_embeddings"][0], "vit_layer0_out": hidden["vit_layers"][0, 0],
              "vit_layer1_out": hidden["vit_layers"][1, 0], "vit_output": out[0]}
    for name, ours in checks.items():
        err, tol = _err(ours, d[name])
        print(f"{name}: max abs err {err:.3g} (tol {tol:.3g})")
        assert err <= tol, (name, err, tol)


def test_packed_images_equal_separate_runs():
    """Two images of different sizes in one row (+ padding) == each image alone."""
    _need_fixture()
    cfg = _vit_cfg()
    params = _tiny_a_params(cfg)
    rng = np.random.default_rng(0)
    a_tok, a_pos = patchify(rng.uniform(-1, 1, (3, 56, 42)).astype(np.float32), 14, MAX_SIDE)  # 4x3
    b_tok, b_pos = patchify(rng.uniform(-1, 1, (3, 28, 70)).astype(np.float32), 14, MAX_SIDE)  # 2x5
    pad = 6
    tokens = np.concatenate([a_tok, b_tok, rng.normal(size=(pad, cfg.patch_dim)).astype(np.float32)])
    pos = np.concatenate([a_pos, b_pos, np.zeros(pad, np.int64)])
    seg = np.concatenate([np.full(len(a_pos), 1), np.full(len(b_pos), 2), np.zeros(pad, np.int64)])
    packed, _ = _run(cfg, params, tokens[None], pos[None], seg[None])
    assert np.all(np.isfinite(np.asarray(packed)))
    alone_a, _ = _run(cfg, params, a_tok[None], a_pos[None], np.ones((1, len(a_pos))))
    alone_b, _ = _run(cfg, params, b_tok[None], b_pos[None], np.ones((1, len(b_pos))))
    na = len(a_pos)
    np.testing.assert_allclose(packed[0, :na], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[0, na:na + len(b_pos)], alone_b[0], atol=1e-5, rtol=0)


def test_remat_policies_same_loss_and_grads():
    cfg = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=2, image_size=8, num_channels=3)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.normal(size=(2, 8, cfg.patch_dim)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 16, (2, 8)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 3, [1] * 6 + [0] * 2], jnp.int32)
    params = jax.jit(SiglipNavit(cfg).init)(jax.random.PRNGKey(0), tokens, pos, seg)["params"]

    def loss(p, policy):
        out = SiglipNavit(cfg, ModelOptions(remat_policy=policy)).apply({"params": p}, tokens, pos, seg)
        return jnp.sum(out[:, :6] ** 2)  # the padding rows of sample 1 are garbage: leave them out

    # One program for every policy of the one table: compiling dominates the run time of this test.
    results = jax.jit(lambda p: [jax.value_and_grad(loss)(p, pol) for pol in REMAT_POLICIES])(params)
    (l0, g0), *others = results
    for l1, g1 in others:
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown remat policy 'bogus'; choose one of none, full, dots, dots_all"):
        SiglipNavit(cfg, ModelOptions(remat_policy="bogus"))


# -------------------------------------------------------------------------------------------------
# Independent cross-check against transformers' SiglipVisionModel
# -------------------------------------------------------------------------------------------------

def _hf_to_official(state_dict) -> dict[str, np.ndarray]:
    """HF SigLIP vision tower -> BAGEL's official ViT layout (relative to ``vit_model.vision_model.``)."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("vision_model.")
        if k.startswith("head."):  # attention-pooling head: BAGEL has none
            continue
        v = v.detach().numpy()
        if k == "embeddings.patch_embedding.weight":  # conv (O, C, p, p) -> Linear (O, p*p*C)
            v = v.transpose(0, 2, 3, 1).reshape(v.shape[0], -1)
        out[k] = v
    return out


def test_matches_transformers_siglip():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
        image_size=56, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(hf_cfg).float().eval()
    with torch.no_grad():  # randomise everything, LayerNorms included, so a swapped tensor shows
        for name, p in hf.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "layernorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    image = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=image).last_hidden_state[0].numpy()

    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    patch_size=14, image_size=56, num_channels=3, layer_norm_eps=1e-6)
    params = keymap.tensors_to_params(key_map(cfg), _hf_to_official(hf.state_dict()))
    tokens, pos = patchify(image[0].numpy(), 14, 4)  # full 4x4 grid: positions 0..15 = HF's arange
    np.testing.assert_array_equal(pos, np.arange(16))
    out, _ = _run(cfg, params, tokens[None], pos[None], np.ones((1, 16)))
    err, tol = _err(out[0], ref)
    print(f"transformers SigLIP: max abs err {err:.3g} (tol {tol:.3g})")
    assert err <= tol
