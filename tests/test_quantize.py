"""int8 weight-only quantization (bagel_jax.quantize, QuantDense, load(..., quantize="int8")): the
per-channel round trip, the bytes in memory, the tiny-a logits against the float32 reference, generation
with the quantized model, and clear errors for a bad mode."""

import json
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import quantize as quant
from bagel_jax.convert.safetensors_io import load_file
from bagel_jax.loading import load_model
from bagel_jax.nn.layers import Dense, QuantDense
from bagel_jax.nn.options import ModelOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _weights(seed=0, shape=(3, 40, 24)):
    """Kernels ``[layers, in, out]`` whose output channels differ in scale by 1000x, one channel all zero."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * np.logspace(-3, 0, shape[-1], dtype=np.float32)
    w[1, :, 5] = 0.0
    return w


def test_round_trip_error_is_at_most_half_a_step_per_channel():
    w = _weights()
    q, s = quant.quantize_int8(jnp.asarray(w))
    q, s = np.asarray(q), np.asarray(s)
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (3, 24) and s.dtype == np.float32
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[s > 0], 127)     # each channel's largest weight -> +-127
    assert s[1, 5] == 0 and not q[1, :, 5].any()                          # a zero channel stays zero
    err = np.abs(np.asarray(quant.dequantize_int8(jnp.asarray(q), jnp.asarray(s))) - w)
    # round to nearest: at most half a step of the channel's own scale (float32 rounding of w/s on top)
    assert np.all(err <= s[:, None, :] * (0.5 + 1e-5))
    assert np.all(err.max(axis=1)[s > 0] > 0.25 * s[s > 0])           # and the bound is not vacuous


def test_quant_dense_float_tree_is_nn_dense_and_int8_tree_is_the_dequantized_matmul():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 40))
    w = _weights()[0]
    b = np.linspace(-1, 1, 24).astype(np.float32)
    float_tree = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    dense = QuantDense(24, dtype=jnp.float32, param_dtype=jnp.float32)
    np.testing.assert_array_equal(dense.apply(float_tree, x), nn.Dense(24).apply(float_tree, x))
    q, s = quant.quantize_int8(jnp.asarray(w))
    y = dense.apply({"params": {"kernel": q, "scale": s, "bias": jnp.asarray(b)}}, x)
    want = x @ quant.dequantize_int8(q, s) + b
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    yb = QuantDense(24, dtype=jnp.bfloat16, param_dtype=jnp.float32).apply(
        {"params": {"kernel": q, "scale": s, "bias": jnp.asarray(b)}}, x)
    assert yb.dtype == jnp.bfloat16            # bfloat16 compute: int8 -> bfloat16 is exact, then bf16 rounding
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)
    assert ModelOptions(quantize="int8").dense(24).__class__ is QuantDense
    # "none": the float layer, nn.Dense's parameters and values (its matmul on a 2-D operand when the leading
    # axes are 1, layers.Dense); also for a packed row [1, seq, in]
    assert ModelOptions().dense(24).__class__ is Dense
    for xs in (x, x[:1], x[:1, None]):
        np.testing.assert_array_equal(Dense(24).apply(float_tree, xs), nn.Dense(24).apply(float_tree, xs))


def test_bad_mode_is_one_clear_error(tiny_a):
    for make in (lambda: ModelOptions(quantize="int4"), lambda: quant.quantize_params({}, "fp8"),
                 lambda: load_model(tiny_a, quantize="INT8")):
        with pytest.raises(ValueError, match=r"unknown quantize mode .*; choose one of none, int8") as e:
            make()
        assert "\n" not in str(e.value)
    sys.path.insert(0, REPO)
    import sample

    with pytest.raises(SystemExit) as e:
        sample.build_parser().parse_args(["generate", "--prompt", "p", "--quantize", "int4"])
    assert e.value.code == 2


def test_sample_quantize_flag_reaches_load(monkeypatch, tiny_a):
    """--quantize int8 (every subcommand) reaches bagel_jax.load in its ModelOptions; the default is none."""
    sys.path.insert(0, REPO)
    import sample
    from bagel_jax.cli import sample as sample_program   # the program behind sample.main
    from bagel_jax.inference import api

    seen = {}

    def fake_load(folder, **kw):
        seen.update(kw)
        raise RuntimeError("stop after load")

    monkeypatch.setattr(api, "load", fake_load)
    for argv, want in ((["--quantize", "int8"], "int8"), ([], "none")):
        args = sample.build_parser().parse_args(["understand", "--model-path", tiny_a, "--question", "q", *argv])
        with pytest.raises(RuntimeError, match="stop after load"):
            sample_program._load(args)
        assert seen["options"].quantize == want


def _kernels(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in p): v for p, v in flat}


@pytest.fixture(scope="module")
def loaded(tiny_a):
    f32 = load_model(tiny_a, dtype=jnp.float32)
    q8 = load_model(tiny_a, dtype=jnp.float32, quantize="int8")
    return f32, q8


def test_int8_load_halves_the_decoder_layer_bytes_against_bf16(loaded):
    f32, q8 = loaded
    a, b = _kernels(f32.params), _kernels(q8.params)
    targets = [p for p in a if p.endswith("/kernel") and p.startswith("language_model/model/")]
    assert len(targets) == 2 * 7                      # q, k, v, o, gate, up, down of both experts
    for p in targets:
        assert b[p].dtype == jnp.int8 and b[p].shape == a[p].shape
        assert b[p[:-len("kernel")] + "scale"].shape == a[p].shape[:-2] + a[p].shape[-1:]
    # everything else is the float32 tree as loaded: embeddings, LM head, norms, biases, ViT, connector
    for p in a:
        if p not in targets:
            assert b[p].dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(b[p]), np.asarray(a[p]))
    layers_bf16 = quant.cast_floats(f32.params["language_model"]["model"], jnp.bfloat16)
    layers_q8 = quant.cast_floats(q8.params["language_model"]["model"], jnp.bfloat16)  # norms, biases in bf16 too
    kb = sum(quant.param_bytes(a[p]) for p in targets) // 2                            # bf16 kernel bytes
    assert sum(quant.param_bytes(b[p]) for p in targets) * 2 == kb
    ratio = quant.param_bytes(layers_q8) / quant.param_bytes(layers_bf16)
    # half, plus one float32 scale per output channel: 4 bytes per (in x out) x 2 bytes -> 2 / in = 2/64 on
    # tiny-a (0.531 measured); 0.5005 at the BAGEL-7B shapes (bench/bench_int8.py bytes)
    assert 0.5 < ratio < 0.5 + 2 / 64 + 0.005, ratio


def _case(tiny_a, name):
    with open(os.path.join(tiny_a, "manifest.json")) as f:
        meta = json.load(f)["cases"][name]
    return meta, load_file(os.path.join(tiny_a, meta["file"]))


def test_tiny_a_logits_within_the_stated_tolerance_of_float32(tiny_a, loaded):
    """Logits of the tiny-a ``text`` parity case (the verifier's own runner) with int8 decoder layers,
    against the fixture's float32 reference. Tolerance: max abs error <= 3e-2 * max|ref logit|, mean <=
    5e-3 * max|ref|. Why: per-channel rounding moves each weight by at most scale/2 = max|w_channel|/254;
    on tiny-a's 64-wide layers this adds up to ~0.5% per matmul and, over 2 layers of 7 matmuls, to a
    measured 0.95e-2 max / 1.7e-3 mean (1.3-1.4e-2 max on the understanding case's logits); 3e-2 keeps 2x
    margin. The float32 model meets the verifier's 1e-4 (4e-7 measured); an int8 error above 1e-4 shows
    that the int8 kernels are what ran."""
    from bagel_jax.parity.encoders import run_text

    q8 = loaded[1]
    fx = types.SimpleNamespace(bm=q8, cfg=q8.cfg, tok=q8.tokenizer, sp=q8.tokenizer.special)
    meta, arr = _case(tiny_a, "text")
    ref = arr["logits"].astype(np.float64)
    scale = np.abs(ref).max()
    err = np.abs(run_text(fx, meta, arr)["logits"] - ref)
    assert err.max() <= 3e-2 * scale and err.mean() <= 5e-3 * scale, (err.max() / scale, err.mean() / scale)
    assert err.max() > 1e-4 * scale


def test_flow_step_runs_with_int8_weights(tiny_a, loaded):
    """One text-to-image flow step (conditional and text-unconditional branch, ``blocks.velocity`` as the
    sampler calls it) with the int8 model on the tiny-a ``gen_single_step`` inputs: the velocities stay
    within 3e-2 * max|v| of the float32 reference (measured 0.9-1.0e-2; 0.7-1.4e-2 over every branch and CFG
    combination of the case, ``bench/bench_int8.py error``)."""
    from bagel_jax.inference import blocks
    from bagel_jax.inference.context import Context, Engine

    meta, arr = _case(tiny_a, "gen_single_step")
    P, eng = meta["params"], Engine(loaded[1])
    ds = eng.cfg.latent_downsample
    pos = blocks.latent_grid(P["t2i_image_hw"][0] // ds, P["t2i_image_hw"][1] // ds, eng.cfg.max_latent_size)
    c = Context.new(eng, 1).add_text(P["t2i_prompt"])
    for name, br in (("cond", c.gen), ("text_uncond", c.cfg_text)):
        v = blocks.velocity(eng.model, eng.params, br.cache, jnp.asarray(arr["t2i.x_t"], jnp.float32)[None],
                                 jnp.float32(P["t"]), pos[None], jnp.asarray(br.rope, jnp.int32), eng.markers)[0]
        ref = arr[f"t2i.v_{name}"].astype(np.float64)
        err = np.abs(np.asarray(v[0]) - ref).max() / np.abs(ref).max()
        assert 1e-4 < err <= 3e-2, (name, err)


def test_int8_load_quantizes_while_loading(tiny_a, loaded, monkeypatch):
    """``load_model(..., quantize="int8")`` quantizes each kernel stack as soon as it is read: the result is
    the float load run through ``quantize_params`` (bit for bit), and no more than one float kernel stack is
    ever alive beside the tree built so far (new device arrays sampled after every tensor read), so the
    peak stays below the float tree's bytes."""
    f32, q8 = loaded
    want = quant.quantize_params(f32.params, "int8")
    a, b = _kernels(want), _kernels(q8.params)
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].dtype == b[p].dtype
        np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]))

    from bagel_jax.convert import official
    before = {id(x) for x in jax.live_arrays()}
    peak, loading = [0], []
    real_read, real_load = official.jax.make_array_from_callback, official.load_params

    def counting(*args, **kw):
        out = real_read(*args, **kw)
        if loading:            # the decoder / ViT file only (the VAE file is loaded after it, in float32)
            live = sum(x.nbytes for x in jax.live_arrays() if id(x) not in before and not x.is_deleted())
            peak[0] = max(peak[0], live)
        return out

    def load_params(path, *args, **kw):
        loading[:] = [True] if str(path).endswith("ema.safetensors") else []
        try:
            return real_load(path, *args, **kw)
        finally:
            loading.clear()

    monkeypatch.setattr(official.jax, "make_array_from_callback", counting)
    monkeypatch.setattr(official, "load_params", load_params)
    m = load_model(tiny_a, dtype=jnp.float32, quantize="int8", with_tokenizer=False)
    float_targets = [quant.param_bytes(v) for p, v in _kernels(f32.params).items() if b[p].dtype == jnp.int8]
    assert peak[0] <= quant.param_bytes(m.params) + max(float_targets), (peak[0], quant.param_bytes(m.params))
    assert peak[0] < quant.param_bytes(f32.params), (peak[0], quant.param_bytes(f32.params))
