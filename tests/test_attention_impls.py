"""Every attention implementation equals the dense reference ("xla") in outputs and gradients on masks
built by the real packing code; "blocked" skips the key blocks the mask vectors prove empty.

"pallas" runs in interpret mode on CPU when bagel_jax/nn/pallas_attention.py exists (skipped otherwise).
Tolerances: float32 blocked softmax vs a dense softmax differ by summation order only; 2e-5 of the
reference's scale (observed ~1e-6).
"""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.config import load_config
from bagel_jax.data import packing
from bagel_jax.data.packing import Capacities, TextItem, VaeItem, VitItem
from bagel_jax.nn.attention import (CacheView, MaskVectors, attention, blocked_attention, chunk_vectors, dense_mask,
                                    resolve_implementation)
from bagel_jax.nn.blocked_attention import block_plan
from bagel_jax.tokenizer import load_tokenizer

HAS_PALLAS = importlib.util.find_spec("bagel_jax.nn.pallas_attention") is not None
IMPLS = ["blocked", pytest.param("pallas", marks=pytest.mark.skipif(
    not HAS_PALLAS, reason="bagel_jax/nn/pallas_attention.py is not in this checkout (helper 'pallas' adds it)"))]
TOL = 2e-5


def _img(h, w, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def packed(tiny_a):
    """Two rows packed by the real code: text with and without loss, ViT images, clean and noised VAE
    images (two noised blocks in one sample), several samples per row, row 1 padded to the longer row
    plus 29 padding tokens. Lengths are no multiple of the blocks used below."""
    cfg = load_config(tiny_a)
    sp = load_tokenizer(tiny_a).special
    ids = lambda n, s: list(np.random.default_rng(s).integers(10, 400, n))
    rows = [
        [[TextItem(ids(23, 0), loss=True), VitItem(_img(56, 42, 1)), TextItem(ids(17, 2), loss=True),
          VaeItem(_img(48, 64, 3), loss=True, t_raw=0.3), TextItem(ids(9, 4))],
         [TextItem(ids(31, 5)), VaeItem(_img(32, 48, 6)), TextItem(ids(25, 7), loss=True)],
         [VitItem(_img(42, 42, 8)), TextItem(ids(12, 9), loss=True)]],
        [[TextItem(ids(40, 10), loss=True), VaeItem(_img(64, 32, 11), loss=True, t_raw=-0.5),
          VaeItem(_img(32, 32, 12), loss=True, t_raw=1.0), TextItem(ids(6, 13))],
         [TextItem(ids(19, 14), loss=True)]],
    ]
    need = packing.pack(rows, sp, cfg).shape[1]
    b = packing.pack(rows, sp, cfg, Capacities(row_len=need + 29))
    assert (b.seg[1] == 0).sum() > 29 and (b.nblk > 0).any() and (b.kind == packing.KIND_VIT).any()
    return MaskVectors(*(jnp.asarray(a, jnp.int32) for a in (b.seg, b.vis, b.nblk)))


def _qkv(B, Lq, Lk, H, K, dh, seed=0):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return f(B, Lq, H, dh), f(B, Lk, K, dh), f(B, Lk, K, dh), f(B, Lq, H, dh)


def _run(impl, q, k, v, w, qv, kv, **kw):
    """Output and (dq, dk, dv) of ``sum(out * w)`` (a random projection of the output)."""
    if impl == "blocked":
        fn = lambda q, k, v: blocked_attention(q, k, v, qv, kv, **kw)
    elif impl == "pallas":
        from bagel_jax.nn.pallas_attention import flash_attention
        fn = lambda q, k, v: flash_attention(q, k, v, qv, kv, interpret=True, **kw)
    else:
        fn = lambda q, k, v: attention(q, k, v, qv, kv, impl)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return out, vjp(w)


def _assert_close(got, want, what, floor=1e-6):
    got, want = np.asarray(got), np.asarray(want)
    scale = max(float(np.abs(want).max()), floor)
    err = float(np.abs(got - want).max())
    assert err <= TOL * scale, f"{what}: max abs error {err:.3e} > {TOL} x scale {scale:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("H,K,dh", [(4, 2, 64), (2, 2, 128)])
def test_equals_xla_on_packed_masks(packed, impl, H, K, dh):
    B, L = packed.seg.shape
    # row 1 sample 1 loses its keys: its (real) queries are fully masked rows, as are the padding queries
    kvec = packed._replace(seg=packed.seg.at[1].set(jnp.where(packed.seg[1] == 2, 0, packed.seg[1])))
    q, k, v, w = _qkv(B, L, L, H, K, dh)
    blocks = dict(block_q=32, block_k=48)
    ref, ref_g = _run("xla", q, k, v, w, packed, kvec)
    got, got_g = _run(impl, q, k, v, w, packed, kvec, **blocks)
    _assert_close(got, ref, "out")
    for name, a, b in zip(("dq", "dk", "dv"), got_g, ref_g):
        _assert_close(a, b, name)
    empty = ~np.asarray(dense_mask(packed, kvec)).any(-1)                       # [B, L] fully masked queries
    assert empty[1].sum() > 29 + 10
    assert (np.asarray(got)[empty] == 0).all() and (np.asarray(ref)[empty] == 0).all()
    assert (np.asarray(got_g[0])[empty] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_xla_queries_subset(packed, impl):
    """Fewer queries than keys (a chunk of queries against the whole pack), H = K, odd lengths."""
    B, L = packed.seg.shape
    Lq = 101
    qv = MaskVectors(*(a[:, 40:40 + Lq] for a in packed))
    q, k, v, w = _qkv(B, Lq, L, 2, 2, 64, seed=1)
    ref, ref_g = _run("xla", q, k, v, w, qv, packed)
    got, got_g = _run(impl, q, k, v, w, qv, packed, block_q=16, block_k=64)
    _assert_close(got, ref, "out")
    for name, a, b in zip(("dq", "dk", "dv"), got_g, ref_g):
        _assert_close(a, b, name)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_blocked_under_remat(packed, policy):
    """The custom VJP inside the layers' remat (jax.checkpoint with the project's policies) gives the same
    gradients as without."""
    from bagel_jax.nn.options import REMAT_POLICIES

    B, L = packed.seg.shape
    q, k, v, w = _qkv(B, L, L, 4, 2, 32, seed=2)
    fn = lambda q, k, v: (blocked_attention(q, k, v, packed, packed, block_q=64, block_k=64) * w).sum()
    want = jax.grad(fn, (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(jax.checkpoint(fn, policy=REMAT_POLICIES[policy]), (0, 1, 2)))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        _assert_close(a, b, name)


def _nonempty_blocks(qv, kv, bq, bk):
    m = np.asarray(dense_mask(qv, kv)).any(0)                                   # [Lq, Lk] over the batch
    Lq, Lk = m.shape
    m = np.pad(m, [(0, -Lq % bq), (0, -Lk % bk)])
    return m.reshape(m.shape[0] // bq, bq, m.shape[1] // bk, bk).any((1, 3))


def test_blocked_skips_masked_blocks(packed):
    """The loop computes exactly the planned blocks; the plan covers every non-empty block and skips
    most of the others (other samples, above the causal diagonal, padding)."""
    L = packed.seg.shape[1]
    bq = bk = 32
    pad = -L % bq
    padded = MaskVectors(*(jnp.pad(a, [(0, 0), (0, pad)]) for a in packed))
    need, ids, count = (np.asarray(a) for a in block_plan(padded, padded, bq, bk))
    nonempty = _nonempty_blocks(packed, packed, bq, bk)
    assert (need >= nonempty).all(), "a block with an allowed pair was planned as skipped"
    assert need.sum() < 0.75 * need.size, (need.sum(), need.size)
    for i in range(need.shape[0]):
        assert sorted(ids[i, :count[i]]) == list(np.nonzero(need[i])[0])
    q, k, v, _ = _qkv(*packed.seg.shape, L, 2, 1, 8)
    _, visited = blocked_attention(q, k, v, packed, packed, block_q=bq, block_k=bk, return_visited=True)
    assert int(visited) == need.sum()


def test_block_plan_is_exact_on_block_aligned_samples():
    """Two causal samples of 64 tokens each and 32 padding tokens, blocks of 32: the plan is the lower
    block triangle of each sample, nothing else (6 of 25 pairs)."""
    seg = np.r_[np.ones(64), np.full(64, 2), np.zeros(32)].astype(np.int32)[None]
    vis = np.r_[np.arange(64), np.arange(64), np.zeros(32)].astype(np.int32)[None]
    vec = MaskVectors(jnp.asarray(seg), jnp.asarray(vis), jnp.zeros_like(jnp.asarray(seg)))
    need = np.asarray(block_plan(vec, vec, 32, 32)[0])
    np.testing.assert_array_equal(need, _nonempty_blocks(vec, vec, 32, 32))
    assert need.sum() == 6


@pytest.mark.parametrize("impl", ["blocked", "pallas"])
def test_cached_path_equals_xla_cached_reference(packed, impl):
    """With a cache every implementation but "xla" runs the blocked cached path; it equals "xla"'s dense
    attention over [valid cache slots ; chunk], for a packed chunk (vectors from the packing code)."""
    B, L = packed.seg.shape
    layers, cap, H, K, dh = 2, 256, 4, 2, 16
    r = np.random.default_rng(3)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    q, k, v = f(B, L, H, dh), f(B, L, K, dh), f(B, L, K, dh)
    view = CacheView(f(layers, B, cap, K, dh), f(layers, B, cap, K, dh), jnp.asarray([0, 77], jnp.int32), 1)
    ref = attention(q, k, v, packed, packed, "xla", cache=view)
    got = jax.jit(lambda *a: attention(*a, impl, cache=view))(q, k, v, packed, packed)
    _assert_close(got, ref, "cached out")
    # row 0 has an empty cache: its padding queries see nothing -> exactly 0
    pad0 = np.asarray(packed.seg[0]) == 0
    assert pad0.any()
    assert (np.asarray(got)[0][pad0] == 0).all()


def test_resolve_and_errors():
    assert resolve_implementation("auto", 256) == "xla"
    assert resolve_implementation(None, 100_000) == "blocked"
    assert resolve_implementation("auto", 8, cached=True) == "blocked"
    assert resolve_implementation("xla", 100_000) == "xla"
    assert resolve_implementation("auto", 1024, auto_min_len=1024) == "xla"       # the inference engine's limit
    assert resolve_implementation("auto", 1025, auto_min_len=1024) == "blocked"
    assert resolve_implementation("auto", 8, cached=True, auto_min_len=1024) == "blocked"
    with pytest.raises(ValueError, match="expected one of: auto, xla, blocked, pallas, cudnn"):
        resolve_implementation("flash", 10)
    vec = chunk_vectors(jnp.asarray([3]), 4, True)
    x = jnp.ones((1, 4, 2, 8))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU.*use 'blocked'"):
            attention(x, x, x, vec, vec, "cudnn")
    if not HAS_PALLAS:
        with pytest.raises(NotImplementedError, match="pallas_attention.py"):
            attention(x, x, x, vec, vec, "pallas")


def test_cudnn_wrapper_under_vmap_and_remat_equals_xla(packed):
    """The "cudnn" wrapper's shape logic (odd lengths padded to even, the mapped axis of the train step's vmap
    folded into the batch by its custom_vmap rules, gradients through its custom VJP, GQA with head_dim 72) run
    with jax's dense implementation in place of cuDNN: same loss and gradients as "xla" under
    vmap(value_and_grad(checkpoint)). bf16 on both sides with the same dense math; the tolerance is one bf16
    rounding of the outputs (2^-8 relative) times 2. The lowering with cuDNN itself: tests/test_gpu_lowering.py."""
    from bagel_jax.nn.attention import cudnn_packed

    B, L = packed.seg.shape
    assert L % 2 == 1                                            # exercises the padding to an even length
    kvec = packed._replace(seg=packed.seg.at[1].set(jnp.where(packed.seg[1] == 2, 0, packed.seg[1])))
    stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])
    group_q = MaskVectors(*(stack(a, a) for a in packed))       # a group of 2 (the train step's vmap axis)
    group_k = MaskVectors(*(stack(a, b) for a, b in zip(packed, kvec)))
    q, k, v, _ = _qkv(2 * B, L, L, 4, 2, 72, seed=3)
    q, k, v = (x.astype(jnp.bfloat16).reshape((2, B) + x.shape[1:]) for x in (q, k, v))

    def run(fn):
        def one(q, k, v, qv, kv):
            out = jax.checkpoint(lambda q, k, v: fn(q, k, v, qv, kv))(q, k, v)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))
        return jax.jit(jax.vmap(jax.value_and_grad(one, argnums=(0, 1, 2))))(q, k, v, group_q, group_k)

    got = run(lambda *a: cudnn_packed(*a, sdpa_impl="xla"))
    want = run(lambda *a: attention(*a, "xla"))
    for name, a, b in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        assert err <= 2 * 2 ** -8 * scale, f"{name}: max abs error {err:.3e} vs scale {scale:.3e}"
    empty = ~np.asarray(dense_mask(packed, kvec)).any(-1)        # fully masked queries of the second group
    assert empty.any() and not np.asarray(got[1][0][1].astype(jnp.float32))[empty].any()


# -------------------------------------------------------------------------------------------------
# the training forward on tiny-a with every implementation
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_case(tiny_a):
    from bagel_jax.convert.safetensors_io import load_file
    from bagel_jax.parity import Fixture, train_case

    manifest = json.load(open(os.path.join(tiny_a, "manifest.json")))
    meta = manifest["cases"]["train_forward"]
    arr = load_file(os.path.join(tiny_a, meta.get("file", "train_forward.safetensors")))
    fx = Fixture(tiny_a, manifest, jnp.float32, "xla")
    ti = train_case.inputs(fx, meta, arr)
    batch, noise, split = ti.batch, ti.noise, ti.split
    return fx.bm, meta, batch, noise, split, _loss_and_grads(fx.bm, "xla", meta, batch, noise, split)


def _loss_and_grads(bm, impl, meta, batch, noise, split):
    from bagel_jax.train.forward import train_forward

    model = bm.model.clone(opts=dataclasses.replace(bm.model.opts, attention_impl=impl))
    P = meta["params"]

    def loss(params):
        return train_forward(model, params, bm.vae, bm.vae_params, batch, noise, ce_weight=float(P.get("ce_weight", 1.0)),
                             mse_weight=float(P.get("mse_weight", 1.0)), expert_split=split)[0]

    return jax.jit(jax.value_and_grad(loss))(bm.params)


@pytest.mark.parametrize("impl", IMPLS + ["cudnn"])
def test_train_forward_same_loss_and_grads(train_case, impl):
    """The tiny-a ``train_forward`` case on the training path (expert streams; decoder and ViT attention both
    switch): same loss and parameter
    gradients as "xla". The k_proj biases have zero gradient in exact arithmetic (softmax is shift
    invariant), so each leaf's scale is floored at 1e-3 of the largest gradient."""
    bm, meta, batch, noise, split, (ref_loss, ref_g) = train_case
    if impl == "cudnn" and jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            _loss_and_grads(bm, impl, meta, batch, noise, split)
        return
    loss, g = _loss_and_grads(bm, impl, meta, batch, noise, split)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_g)[0])
    floor = 1e-3 * max(float(np.abs(np.asarray(x)).max()) for x in flat_ref.values())
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        _assert_close(leaf, flat_ref[path], jax.tree_util.keystr(path), floor)


def test_one_setting_selects_decoder_and_vit_attention():
    """``train.attention_impl`` is validated with the list of names and reaches the decoder and the ViT."""
    from bagel_jax.config import ConfigError
    from bagel_jax.loading import build_modules
    from bagel_jax.train.optimizer import TrainConfig

    assert TrainConfig.from_dict({}).attention_impl == "auto"
    assert TrainConfig.from_dict({"attention_impl": "blocked"}).attention_impl == "blocked"
    with pytest.raises(ConfigError, match=r"train: unknown attention implementation 'flash' \(expected one of: auto, "
                                          r"xla, blocked, pallas, cudnn\)"):
        TrainConfig.from_dict({"attention_impl": "flash"})
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "bagel_jax", "assets", "demo"))
    model, _ = build_modules(cfg, attention_impl="blocked")
    bound = model.bind({})
    bound.language_model.stack  # noqa: B018  (setup runs lazily)
    assert bound.language_model.opts.attention_impl == "blocked"
    assert bound.vit_model.opts.attention_impl == "blocked"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        build_modules(cfg, attention_impl="flash")
