"""FLUX autoencoder: key map <-> checkpoint <-> init tree, parity with the tiny-a golden fixture
(official BAGEL / FLUX code) and an independent cross-check against ``diffusers.AutoencoderKL``."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.config import VAEConfig, config_from_folder
from bagel_jax.convert import keymap
from bagel_jax.models import flux_vae
from bagel_jax.models.flux_vae import AutoEncoder, key_map, latent_from_moments, sample_latent
from bagel_jax.nn import intermediates

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny-a"


def _fixture_dir() -> pathlib.Path:
    if not (FIXTURE / "ae.safetensors").is_file():
        raise FileNotFoundError(f"golden fixture tiny-a not found at {FIXTURE} (part of the repository)")
    return FIXTURE


def _assert_close(name, ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = np.abs(ours - ref).max()
    tol = rel * max(1.0, np.abs(ref).max())
    assert err <= tol, f"{name}: max abs err {err:.3e} > {tol:.3e}"
    return err


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _init_shapes(cfg: VAEConfig, hw: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    x = jnp.zeros((1, hw, hw, cfg.in_channels), jnp.float32)
    tree = jax.eval_shape(AutoEncoder(cfg).init, jax.random.PRNGKey(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


# -------------------------------------------------------------------------------------------------
# Key map
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    VAEConfig(ch=32, ch_mult=(1, 1, 1, 1)),                                  # tiny-a
    VAEConfig(ch=32, ch_mult=(2, 1, 3), num_res_blocks=1, downsample=4),      # width changes everywhere, ch_mult[0] != 1
    VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=3, downsample=2, z_channels=4, in_channels=4, out_ch=2),
], ids=["tiny-a", "odd-mults", "two-levels"])
def test_key_map_matches_init_tree(cfg):
    entries = key_map(cfg)
    assert len({e.official for e in entries}) == len(entries), "duplicate official names"
    assert len({e.path for e in entries}) == len(entries), "duplicate param paths"
    shapes = _init_shapes(cfg, 2 ** len(cfg.ch_mult) * 2)
    assert set(shapes) == {e.path for e in entries}
    for e in entries:
        if e.transform == "conv":
            assert len(shapes[e.path]) == 4, e.official


def test_key_map_matches_checkpoint():
    folder = _fixture_dir()
    from safetensors.numpy import load_file
    cfg = config_from_folder(str(folder)).vae
    tensors = load_file(str(folder / "ae.safetensors"))
    entries = key_map(cfg)
    names = {e.official for e in entries}
    assert len(tensors) == 236
    assert names == set(tensors), (f"missing in key map: {sorted(set(tensors) - names)[:5]}; "
                                   f"not in checkpoint: {sorted(names - set(tensors))[:5]}")
    shapes = _init_shapes(cfg, 64)
    for e in entries:
        assert keymap.official_shape(shapes[e.path], e.transform) == tensors[e.official].shape, e.official
    # round trip through our layout
    back = keymap.params_to_tensors(entries, keymap.tensors_to_params(entries, tensors))
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)


# -------------------------------------------------------------------------------------------------
# Parity with the official code (golden fixture)
# -------------------------------------------------------------------------------------------------

def test_fixture_parity():
    folder = _fixture_dir()
    from safetensors.numpy import load_file
    cfg = config_from_folder(str(folder)).vae
    params = keymap.tensors_to_params(key_map(cfg), load_file(str(folder / "ae.safetensors")))
    case = load_file(str(folder / "vae.safetensors"))
    image, eps = _nhwc(case["image"]), _nhwc(case["posterior_eps"])

    model = AutoEncoder(cfg)
    variables = {"params": params}
    moments, inter_e = jax.jit(lambda x: intermediates.apply(
        model, variables, x, method=AutoEncoder.encode_moments))(image)
    lat_mean = latent_from_moments(moments, cfg)
    lat_samp = latent_from_moments(moments, cfg, eps)
    decode = jax.jit(lambda z: intermediates.apply(model, variables, z, method=AutoEncoder.decode))
    dec_mean, inter_d = decode(lat_mean)
    dec_samp, _ = decode(lat_samp)

    checks = {
        "encoder_moments": (moments, case["encoder_moments"]),
        "posterior_mean": (moments[..., :cfg.z_channels], case["posterior_mean"]),
        "posterior_logvar": (moments[..., cfg.z_channels:], case["posterior_logvar"]),
        "latent_from_mean": (lat_mean, case["latent_from_mean"]),
        "latent_sampled": (lat_samp, case["latent_sampled"]),
        "decoded_from_mean": (dec_mean, case["decoded_from_mean"]),
        "decoded_from_sampled": (dec_samp, case["decoded_from_sampled"]),
        "encoder_mid_out": (inter_e["encoder_mid_out"], case["encoder_mid_out"]),
        "decoder_conv_in_out": (inter_d["decoder_conv_in_out"], case["decoder_conv_in_out_from_mean"]),
        "decoder_mid_out": (inter_d["decoder_mid_out"], case["decoder_mid_out_from_mean"]),
    }
    errs = {name: _assert_close(name, _nchw(ours), ref) for name, (ours, ref) in checks.items()}
    print("fixture max abs errors:", {k: f"{v:.2e}" for k, v in errs.items()})


def test_sample_latent_uses_key():
    cfg = VAEConfig(ch=32, ch_mult=(1, 1), downsample=2, z_channels=4)
    moments = np.random.default_rng(1).normal(size=(2, 3, 5, 8)).astype(np.float32)
    key = jax.random.PRNGKey(7)
    eps = jax.random.normal(key, (2, 3, 5, 4))
    np.testing.assert_allclose(sample_latent(moments, cfg, key), latent_from_moments(moments, cfg, eps), rtol=1e-6)
    mean, logvar = moments[..., :4], moments[..., 4:]
    np.testing.assert_allclose(latent_from_moments(moments, cfg, eps),
                               cfg.scale_factor * (mean + jnp.exp(0.5 * logvar) * eps - cfg.shift_factor), rtol=1e-6)


# -------------------------------------------------------------------------------------------------
# Independent cross-check against diffusers' AutoencoderKL (same architecture, other code base)
# -------------------------------------------------------------------------------------------------

def _diffusers_to_flux(sd: dict, n_levels: int) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL state dict -> official FLUX ``ae.safetensors`` names and layouts.

    diffusers ``up_blocks`` run from the lowest resolution, FLUX ``up`` is indexed by resolution
    level (0 = full), so ``up_blocks.i`` is ``up.{n-1-i}``. Attention projections are Linear
    ``(c, c)`` in diffusers, 1x1 convs ``(c, c, 1, 1)`` in FLUX.
    """
    out = {}
    for name, t in sd.items():
        x = t.detach().cpu().numpy()
        parts = name.split(".")
        side, rest = parts[0], parts[1:]
        if rest[0] == "down_blocks":
            i, kind = rest[1], rest[2]
            if kind == "resnets":
                new = ["down", i, "block", rest[3]] + rest[4:]
            else:  # downsamplers.0.conv.*
                new = ["down", i, "downsample"] + rest[4:]
        elif rest[0] == "up_blocks":
            i, kind = str(n_levels - 1 - int(rest[1])), rest[2]
            if kind == "resnets":
                new = ["up", i, "block", rest[3]] + rest[4:]
            else:  # upsamplers.0.conv.*
                new = ["up", i, "upsample"] + rest[4:]
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                new = ["mid", f"block_{int(rest[2]) + 1}"] + rest[3:]
            else:  # attentions.0.<proj>.*
                proj = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
                tail = rest[5:] if rest[3] == "to_out" else rest[4:]  # to_out.0.weight
                new = ["mid", "attn_1", proj] + tail
                if proj != "norm" and tail[-1] == "weight":
                    x = x[:, :, None, None]
        elif rest[0] == "conv_norm_out":
            new = ["norm_out"] + rest[1:]
        else:  # conv_in, conv_out
            new = rest
        new = [("nin_shortcut" if p == "conv_shortcut" else p) for p in new]
        out[".".join([side] + new)] = x
    return out


def test_matches_diffusers_autoencoderkl():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    widths, layers = (32, 64), 2
    n = len(widths)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=layers,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True).eval()
    # Re-randomise everything (as the fixture does) so that no norm is the identity and no bias is zero.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                is_norm = "norm" in name
                p.copy_(1 + 0.1 * r if is_norm and name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(r / np.sqrt(np.prod(p.shape[1:])))

    cfg = VAEConfig(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=layers,
                    z_channels=16, downsample=2 ** (n - 1))
    cfg.validate()
    tensors = _diffusers_to_flux(vae.state_dict(), n)
    entries = key_map(cfg)
    assert {e.official for e in entries} == set(tensors)  # a second, independent source of FLUX names
    params = keymap.tensors_to_params(entries, tensors)
    model = AutoEncoder(cfg)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 24, 16)).astype(np.float32)   # batch 2, non-square
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
    moments = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=AutoEncoder.encode_moments))(
        {"params": params}, _nhwc(x)))
    mean, logvar = _nchw(moments[..., :16]), _nchw(moments[..., 16:])
    # diffusers clamps logvar to [-30, 20]; make sure that clamp is inactive for this input.
    assert -30 < logvar.min() and logvar.max() < 20
    e_mean = _assert_close("diffusers mean", mean, ref_mean)
    e_logvar = _assert_close("diffusers logvar", logvar, ref_logvar)

    # diffusers' decode takes the raw latent; ours takes scale * (raw - shift).
    z_raw = rng.normal(size=(2, 16, 12, 8)).astype(np.float32)
    with torch.no_grad():
        ref_img = vae.decode(torch.from_numpy(z_raw)).sample.numpy()
    z = cfg.scale_factor * (_nhwc(z_raw) - cfg.shift_factor)
    img = jax.jit(lambda v, z: model.apply(v, z, method=AutoEncoder.decode))({"params": params}, z)
    e_img = _assert_close("diffusers decode", _nchw(img), ref_img)
    print(f"diffusers max abs errors: mean {e_mean:.2e} logvar {e_logvar:.2e} decode {e_img:.2e}")


def test_bf16_compute_runs():
    """bf16 compute with float32 params: same shapes, output dtype bf16, close to float32."""
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), downsample=2, num_res_blocks=1, z_channels=4)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    # Random params from the init shapes (a jitted Flax init with truncated-normal initialisers
    # takes >10 s to compile on CPU).
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(AutoEncoder(cfg).init, jax.random.PRNGKey(0), x)["params"]
    params = jax.tree.map(lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) if len(s.shape) > 1
                                                                        else 10.0)).astype(np.float32), shapes)
    y32 = jax.jit(AutoEncoder(cfg).apply)({"params": params}, x)
    y16 = jax.jit(AutoEncoder(cfg, dtype=jnp.bfloat16).apply)({"params": params}, x)
    assert y16.dtype == jnp.bfloat16 and y16.shape == y32.shape == (1, 16, 16, 3)
    assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) < 0.1 * max(1.0, float(jnp.abs(y32).max()))


# -------------------------------------------------------------------------------------------------
# Fast formulations against the plain ones
# -------------------------------------------------------------------------------------------------

def _group_norm_reference(x, scale, bias, groups, eps):
    """Two-pass GroupNorm in float64 (torch's formula)."""
    n, h, w, c = x.shape
    xg = np.asarray(x, np.float64).reshape(n, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = np.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(n, h, w, c) * scale + bias


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_group_norm_matches_two_pass_reference(offset):
    """The per-channel GroupNorm equals the grouped two-pass formula within float32 rounding, also when the
    mean is large against the spread (offset 30, std ~2: where a one-pass E[x^2] - E[x]^2 loses ~1e-4)."""
    rng = np.random.default_rng(0)
    c, groups, eps = 32, 8, 1e-6
    x = (rng.normal(size=(2, 12, 10, c)) * rng.uniform(0.5, 3, c) + offset + rng.normal(size=c)).astype(np.float32)
    scale, bias = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    y = flux_vae.GroupNorm(groups, eps).apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))
    ref = _group_norm_reference(x, scale, bias, groups, eps)
    _assert_close("group norm", y, ref, rel=2e-6)   # float32 rounding of sums over 120 * 4 values


def test_upsample_matches_repeat_then_conv():
    """The sub-pixel upsample equals nearest x2 (repeat) followed by the 3x3 conv (pad 1), including the
    borders, for a non-square input and different in / out widths of the kernel."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 7, 6)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 6, 4)) * 0.3).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    y = flux_vae._UpsampleConv(4).apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2).astype(np.float64)
    up = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(np.einsum("nhwc,co->nhwo", up[:, i:i + 10, j:j + 14], kernel[i, j]) for i in range(3) for j in range(3))
    _assert_close("upsample", y, ref + bias, rel=1e-6)
    params = flux_vae.Upsample().init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    assert jax.tree.map(np.shape, params) == {"conv": {"kernel": (3, 3, 6, 6), "bias": (6,)}}
