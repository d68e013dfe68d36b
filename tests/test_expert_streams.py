"""Expert streams (each MoT expert runs once, on its own tokens) and chunked CE in the training forward.

The stream layout is checked against the logical packed order with ``Routing.select`` as the oracle
(both experts on every token, one kept): same losses and gradients. Tolerances (float32): losses rtol
1e-5; gradients 1e-5 of each leaf's largest magnitude. The two paths multiply the same numbers; only
the order of floating-point sums differs (attention over a permuted key order, scatter-adds in the
backward), observed below 1e-6.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.data import packing
from bagel_jax.data.packing import Capacities, PositionGap, TextItem, VaeItem, VitItem
from bagel_jax.loading import load_model
from bagel_jax.models.bagel import Bagel
from bagel_jax.models.qwen2_mot import Routing
from bagel_jax.nn.attention import MaskVectors
from bagel_jax.train.forward import chunked_ce, draw_noise, train_forward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bm(tiny_a):
    return load_model(tiny_a)


def img(h, w, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


def rows_mixed():
    """Two packs (rows) of several samples each: text (with and without loss), ViT images, clean and
    noised VAE images, a position gap; row 0 is und-heavy, row 1 gen-heavy."""
    r0 = [[VitItem(img(28, 42, 0)), TextItem([5, 6, 7]), TextItem([8, 9, 10, 11], loss=True)],
          [TextItem([12, 13], loss=True), VaeItem(img(16, 32, 1), loss=True, t_raw=0.4)],
          [VitItem(img(28, 28, 2)), TextItem([14, 15, 16, 17, 18], loss=True)]]
    r1 = [[TextItem([20, 21, 22], loss=True), VaeItem(img(64, 48, 3), loss=True, t_raw=-0.3)],
          [VaeItem(img(32, 32, 4), loss=False), PositionGap(1), TextItem([23, 24]),
           VaeItem(img(48, 64, 5), loss=True, t_raw=1.1), TextItem([25], loss=True)]]
    return [r0, r1]


def packed(bm, caps=Capacities()):
    return packing.pack(rows_mixed(), bm.tokenizer.special, bm.cfg, caps)


def logical_caps(b, row_len=None):
    B, L = b.shape
    return Capacities(rows=B, row_len=row_len or L + 5, vit_tokens=b.vit_seg.shape[0] + 3,
                      latent_tokens=b.vae_src.shape[0] + 4, vae_images=b.vae_images.shape[0] + 1,
                      ce_tokens=b.ce_index.shape[0] + 6)


def stream_test_batch(bm, overlap):
    """The mixed rows with padding everywhere; rows long enough for a plain split unless ``overlap``
    (then the und-heavy and the gen-heavy row need overlapping windows)."""
    tight = packed(bm)
    und, gen = packing.expert_counts(tight)
    L = tight.shape[1] + 5 if overlap else int(und.max() + gen.max()) + 3
    return packing.pack(rows_mixed(), bm.tokenizer.special, bm.cfg, logical_caps(tight, L))


# -------------------------------------------------------------------------------------------------
# Layout
# -------------------------------------------------------------------------------------------------

def assert_batches_equal(a: packing.PackedBatch, b: packing.PackedBatch):
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k], err_msg=k)


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_layout_round_trips_and_keeps_the_mask(bm, overlap):
    logical = stream_test_batch(bm, overlap)
    B, L = logical.shape
    und, gen = packing.expert_counts(logical)
    assert und[0] > gen[0] and gen[1] > und[1]
    if overlap:                      # tight windows: the rows' different mixes make them overlap
        U, G = int(und.max()), int(gen.max())
        assert U + G > L
    else:
        U, G = int(und.max()), L - int(und.max())
        assert G >= gen.max()
    s, perm = packing.to_expert_streams(logical, U, G)
    # the layout: und tokens inside the first U slots, gen tokens inside the last G, padding between
    for r in range(B):
        kinds = s.kind[r]
        np.testing.assert_array_equal(np.nonzero((kinds == packing.KIND_TEXT) | (kinds == packing.KIND_VIT))[0],
                                      np.arange(und[r]))
        np.testing.assert_array_equal(np.nonzero(kinds == packing.KIND_VAE)[0], np.arange(L - gen[r], L))
        assert und[r] <= U and L - gen[r] >= L - G
    # every per-token value moved with its token; vis keeps the logical order index
    rows = np.arange(B)[:, None]
    for k in ("token_ids", "kind", "positions", "seg", "vis", "nblk"):
        np.testing.assert_array_equal(getattr(s, k), getattr(logical, k)[rows, perm], err_msg=k)
    # index arrays point at the same tokens (dump entries stay the dump)
    for k in ("vit_dest", "vae_dest", "ce_index"):
        old, new = getattr(logical, k), getattr(s, k)
        np.testing.assert_array_equal(new == B * L, old == B * L, err_msg=k)
        real = old < B * L
        np.testing.assert_array_equal(s.positions.reshape(-1)[new[real]], logical.positions.reshape(-1)[old[real]])
        np.testing.assert_array_equal(perm.reshape(-1)[new[real]] + (new[real] // L) * L, old[real], err_msg=k)
    # same allowed pairs, permuted
    m_log, m_s = packing.dense_mask_np(logical), packing.dense_mask_np(s)
    np.testing.assert_array_equal(m_s, np.stack([m_log[r][np.ix_(perm[r], perm[r])] for r in range(B)]))
    # round trip; pack() builds the same layout when asked
    assert_batches_equal(packing.from_expert_streams(s, perm), logical)
    caps = logical_caps(packed(bm), L)
    direct = packing.pack(rows_mixed(), bm.tokenizer.special, bm.cfg,
                          Capacities(**{**caps.__dict__, "und_tokens": U, "gen_tokens": G}))
    assert_batches_equal(direct, s)
    x = np.random.default_rng(0).normal(size=(3, B, L, 2))
    np.testing.assert_array_equal(packing.unpermute_tokens(x[:, rows, perm], perm, axis=1), x)


def test_stream_layout_errors(bm):
    b = packed(bm)
    und, gen = packing.expert_counts(b)
    L = b.shape[1]
    with pytest.raises(packing.PackingError, match="expert streams"):
        packing.to_expert_streams(b, int(und.max()) - 1)
    with pytest.raises(packing.PackingError, match="expert streams"):
        packing.to_expert_streams(b, int(und.max()), L - int(und.max()) - 1)   # a gap no expert covers


def test_choose_stream_layout():
    # fits without overlap: U on the grid of 128/8 = 16, G the rest
    assert packing.choose_stream_layout([30, 50], [60, 40], [64, 128], 8) == (128, 64, 64)
    # the longest row picks the bucket; the und/gen maxima of different rows force an overlap
    assert packing.choose_stream_layout([100, 10], [20, 110], [128], 8) == (128, 112, 112)
    assert packing.choose_stream_layout([0, 0], [7, 3], [16], 4) == (16, 0, 16)
    assert packing.choose_stream_layout([9], [0], [16], 4) == (16, 12, 4)
    with pytest.raises(packing.PackingError, match="exceeds the largest row bucket"):
        packing.choose_stream_layout([100], [29], [64, 128], 8)
    # property: every choice fits its rows, lies on the grid, and few layouts exist per bucket
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):
        n = rng.integers(1, 5)
        tot = rng.integers(1, 129, n)
        und = [int(rng.integers(0, t + 1)) for t in tot]
        gen = [int(t - u) for t, u in zip(tot, und)]
        L, U, G = packing.choose_stream_layout(und, gen, [64, 128], 8)
        grid = {-(-k * L // 8) for k in range(9)}
        assert L >= max(tot) and (L == 64 or max(tot) > 64)
        assert U >= max(und) and G >= max(gen) and U + G >= L and U in grid and (G in grid or G == L - U)
        # tokens run by both experts: only what the rows' different mixes need, plus grid rounding
        assert U + G - L <= max(0, max(und) + max(gen) - L) + 2 * -(-L // 8)
        if U + max(gen) <= L:
            assert G == L - U
        seen.add((L, U, G))
    assert len(seen) <= 2 * 9 * 10


# -------------------------------------------------------------------------------------------------
# Routing and the training forward
# -------------------------------------------------------------------------------------------------

def test_overlapping_split_routing_equals_select(bm):
    rng = np.random.default_rng(1)
    B, L, D = 2, 12, bm.cfg.llm.hidden_size
    x = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))
    pos = jnp.asarray(rng.integers(0, 20, (B, L)))
    vec = MaskVectors(jnp.ones((B, L), jnp.int32), jnp.asarray(rng.integers(0, L, (B, L))), jnp.zeros((B, L), jnp.int32))
    mask = vec   # the decoder reads the mask vectors
    # row 0: 7 und then 5 gen; row 1: 4 und then 8 gen -> windows und 7, gen 8 overlap on 3 tokens
    is_gen = jnp.asarray(np.stack([np.arange(L) >= 7, np.arange(L) >= 4]))
    p = {"params": bm.params}
    h1, kv1 = bm.model.apply(p, x, pos, mask, Routing.split(7, 8), is_gen, method=Bagel.decode)
    h2, kv2 = bm.model.apply(p, x, pos, mask, Routing.select(), is_gen, method=Bagel.decode)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kv1[0]), np.asarray(kv2[0]), atol=1e-5)
    with pytest.raises(ValueError, match="without an expert"):
        bm.model.apply(p, x, pos, mask, Routing.split(5, 5), is_gen, method=Bagel.decode)


def _loss_and_grads(bm, batch, noise, **kw):
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}

    def f(params, vae_params, arrays, noise):   # everything an argument: no constant folding of the VAE
        loss, aux = train_forward(bm.model, params, bm.vae, vae_params, arrays, noise, **kw)
        return loss, aux

    (loss, aux), g = jax.jit(jax.value_and_grad(f, has_aux=True))(bm.params, bm.vae_params, arrays, noise)
    return float(loss), jax.device_get(aux), jax.device_get(g)


def assert_grads_close(ga, gb, rel=1e-5):
    """Each leaf within ``rel`` of its largest magnitude. Leaves whose exact gradient is zero (key
    biases: softmax ignores a constant added to all scores of a query) hold rounding noise only, so the
    scale has a floor of 1e-3 of the largest gradient anywhere (noise seen: 3e-10 of it)."""
    flat_a = jax.tree_util.tree_leaves_with_path(ga)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(gb))
    assert len(flat_a) == len(flat_b)
    top = max(float(np.abs(a).max()) for _, a in flat_a)
    nonzero = 0
    for path, a in flat_a:
        b = flat_b[path]
        scale = max(float(np.abs(a).max()), 1e-3 * top)
        nonzero += float(np.abs(a).max()) > 1e-3 * top
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=rel * scale, err_msg=str(path))
    assert nonzero > len(flat_a) // 2


# overlap=True is slow (about 1 min): the overlapping split itself is covered fast by
# test_overlapping_split_routing_equals_select
@pytest.mark.parametrize("overlap", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_stream_forward_equals_select_forward(bm, overlap):
    logical = stream_test_batch(bm, overlap)
    B, L = logical.shape
    und, gen = packing.expert_counts(logical)
    U = int(und.max())
    G = int(gen.max()) if overlap else L - U
    s, perm = packing.to_expert_streams(logical, U, G)
    noise = draw_noise(jax.random.PRNGKey(3), logical.arrays(), bm.cfg)   # indexed by image / latent, not by slot
    kw = dict(ce_loss_reweighting=True, ce_chunk_tokens=5)
    la, aux_a, ga = _loss_and_grads(bm, logical, noise, **kw)
    lb, aux_b, gb = _loss_and_grads(bm, s, noise, expert_split=(U, G), **kw)
    assert np.isfinite(la) and float(aux_a["n_mse"]) > 0 and float(aux_a["n_ce"]) > 0
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for k in ("ce", "mse", "n_ce", "n_mse"):
        np.testing.assert_allclose(float(aux_b[k]), float(aux_a[k]), rtol=1e-5, err_msg=k)
    assert_grads_close(ga, gb)


# -------------------------------------------------------------------------------------------------
# Chunked CE
# -------------------------------------------------------------------------------------------------

def test_chunked_ce_function_equals_log_softmax():
    rng = np.random.default_rng(2)
    N, D, V, n = 30, 8, 50, 13
    h = jnp.asarray(rng.normal(size=(N, D)).astype(np.float32))
    W = jnp.asarray(rng.normal(size=(D, V)).astype(np.float32))
    idx = jnp.asarray(rng.integers(0, N, n))
    lab = jnp.asarray(rng.integers(0, V, n))
    wt = jnp.asarray(rng.uniform(0, 2, n).astype(np.float32))

    def ref(h, W):
        logp = jax.nn.log_softmax(h[idx] @ W, axis=-1)
        return -jnp.take_along_axis(logp, lab[:, None], axis=-1)[:, 0]

    want = ref(h, W)
    g_want = jax.grad(lambda h, W: (ref(h, W) * wt).sum(), argnums=(0, 1))(h, W)
    for chunk in (None, 1, 4, 5, 13, 100):
        got = chunked_ce(lambda x: x @ W, h, idx, lab, chunk)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=str(chunk))
        g = jax.grad(lambda h, W: (chunked_ce(lambda x: x @ W, h, idx, lab, chunk) * wt).sum(), argnums=(0, 1))(h, W)
        for a, b in zip(g, g_want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(chunk))


def test_chunked_ce_keeps_one_chunk_of_logits():
    """The jitted loss + gradient never builds the whole ``[Nce, vocab]`` logits: no intermediate of
    that size appears in the compiled program's buffers (checked on the HLO text)."""
    N, D, V, n, c = 64, 16, 997, 96, 8
    h = jnp.ones((N, D), jnp.float32)
    W = jnp.ones((D, V), jnp.float32)
    idx = jnp.arange(n) % N
    lab = jnp.arange(n) % V
    f = lambda h, W, chunk: chunked_ce(lambda x: x @ W, h, idx, lab, chunk).sum()
    hlo = lambda chunk: jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2).lower(h, W, chunk).compile().as_text()
    assert f"f32[{n},{V}]" in hlo(None)
    text = hlo(c)
    assert f"f32[{n},{V}]" not in text and f"f32[{n // c},{c},{V}]" not in text
    assert f"f32[{c},{V}]" in text


@pytest.mark.slow   # ~1.5 min; the chunked CE itself: test_chunked_ce_function_equals_log_softmax (default run)
def test_chunked_ce_in_train_forward(bm):
    b = stream_test_batch(bm, overlap=False)   # 6 padding CE entries
    assert (b.ce_valid == 0).sum() == 6
    und, gen = packing.expert_counts(b)
    U = int(und.max())
    s, _ = packing.to_expert_streams(b, U)
    noise = draw_noise(jax.random.PRNGKey(5), b.arrays(), bm.cfg)
    tw = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, b.ce_index.shape).astype(np.float32))
    for rw in (False, True):
        base = dict(ce_loss_reweighting=rw, token_loss_weights=tw, expert_split=(U, b.shape[1] - U))
        la, aux_a, ga = _loss_and_grads(bm, s, noise, ce_chunk_tokens=None, **base)
        for chunk in (7,):   # several chunks, the last one padded (chunk sizes alone: the two tests above)
            lb, aux_b, gb = _loss_and_grads(bm, s, noise, ce_chunk_tokens=chunk, **base)
            np.testing.assert_allclose(lb, la, rtol=1e-6, err_msg=f"reweight {rw} chunk {chunk}")
            np.testing.assert_allclose(float(aux_b["ce"]), float(aux_a["ce"]), rtol=1e-6)
            assert_grads_close(ga, gb)


# -------------------------------------------------------------------------------------------------
# Loader, step, FLOPs, config
# -------------------------------------------------------------------------------------------------

def test_loader_collates_expert_streams(tmp_path):
    from train_helpers import make_data

    from bagel_jax.config import config_from_yaml
    from bagel_jax.data.loader import DataConfig, PackedIterator
    from bagel_jax.tokenizer import load_tokenizer
    from bagel_jax.train.step import batch_expert_split

    data = make_data(str(tmp_path / "syn"), num=24, bad=0)
    cfg = config_from_yaml(os.path.join(REPO, "configs", "train-tiny.yaml"))
    steps = 4
    dc = DataConfig(expected_num_tokens=96, max_num_tokens=128, max_num_tokens_per_sample=128, prefer_buffer_before=64,
                    row_buckets=(64, 128), vae_images_per_pack=6, packs_per_step=4, und_split_steps=steps)
    it = PackedIterator(data, dc, cfg, load_tokenizer(os.path.join(data, "tokenizer")), accum=2)
    seen = set()
    for _ in range(6):
        arr, ntok = it.next_batch()
        U, G = batch_expert_split(arr)
        assert arr["expert_split"].shape == (2, 4, 2)
        L = arr["token_ids"].shape[-1]
        assert L in (64, 128) and U + G >= L
        grid = {-(-k * L // steps) for k in range(steps + 1)}
        assert U in grid and (G in grid or G == L - U)
        kind = arr["kind"].reshape(-1, L)
        real = 0
        for row in kind:
            und = np.nonzero((row == packing.KIND_TEXT) | (row == packing.KIND_VIT))[0]
            gen = np.nonzero(row == packing.KIND_VAE)[0]
            np.testing.assert_array_equal(und, np.arange(len(und)))           # und first ...
            np.testing.assert_array_equal(gen, np.arange(L - len(gen), L))    # ... gen last
            assert len(und) <= U and len(gen) <= G
            real += len(und) + len(gen)
        assert real == ntok
        # the CE / latent / ViT index arrays point at tokens of the right kind
        flat = arr["kind"].reshape(-1, L)
        for a, g in np.ndindex(2, 4):
            k = arr["kind"][a, g, 0]
            ce = arr["ce_index"][a, g][arr["ce_valid"][a, g] > 0]
            assert np.isin(k[ce], [packing.KIND_TEXT]).all()
            vd = arr["vae_dest"][a, g]
            assert (k[vd[vd < L]] == packing.KIND_VAE).all()
            vt = arr["vit_dest"][a, g]
            assert (k[vt[vt < L]] == packing.KIND_VIT).all()
        seen.add((L, U, G))
    assert len(seen) >= 1 and flat.shape[0] == 8
    assert batch_expert_split({"token_ids": np.zeros((1, 1, 1, 4))}) is None
    with pytest.raises(ValueError, match="different expert splits"):
        batch_expert_split({"expert_split": np.array([[[4, 4], [8, 4]]])})


def test_allowed_pairs_and_step_flops(bm):
    from bagel_jax.train.metrics import step_flops

    logical = packed(bm)
    loose = stream_test_batch(bm, overlap=False)
    pairs = packing.allowed_pairs(loose.seg, loose.vis, loose.nblk)
    np.testing.assert_array_equal(pairs, packing.dense_mask_np(loose).sum(axis=(1, 2)))
    und, _ = packing.expert_counts(loose)
    s, _ = packing.to_expert_streams(loose, int(und.max()))
    np.testing.assert_array_equal(packing.allowed_pairs(s.seg, s.vis, s.nblk), pairs)
    # model FLOPs do not depend on the layout or on padding
    f = step_flops(bm.cfg, logical.arrays())
    assert step_flops(bm.cfg, loose.arrays()) == pytest.approx(f, rel=1e-12)
    assert step_flops(bm.cfg, s.arrays()) == pytest.approx(f, rel=1e-12)
    # the decoder terms written out: each real token through one expert, attention over allowed pairs
    llm = bm.cfg.llm
    D, F, H, K, dh, nl = (llm.hidden_size, llm.intermediate_size, llm.num_attention_heads, llm.num_key_value_heads,
                          llm.head_dim, llm.num_hidden_layers)
    tokens = int((logical.seg > 0).sum())
    dec = tokens * nl * 2 * (D * (H + 2 * K) * dh + H * dh * D + 3 * D * F) + 4 * nl * H * dh * int(pairs.sum())
    head = logical.ce_valid.sum() * 2 * D * llm.vocab_size
    assert f / 3 > dec + head and f / 3 < 1.5 * (dec + head)   # the rest: ViT, connector, latent heads


def test_config_fields_validated():
    from bagel_jax.config import ConfigError
    from bagel_jax.data.datasets import DataConfigError
    from bagel_jax.data.loader import DataConfig
    from bagel_jax.train.optimizer import TrainConfig

    assert TrainConfig().ce_chunk_tokens == 1024
    assert TrainConfig.from_dict({"ce_chunk_tokens": 64}).ce_chunk_tokens == 64
    for bad in (0, -3, 1.5, True, "8"):
        with pytest.raises(ConfigError, match="ce_chunk_tokens"):
            TrainConfig.from_dict({"ce_chunk_tokens": bad})
    assert DataConfig.from_dict({"und_split_steps": 2}).und_split_steps == 2
    for bad in (0, 2.5, False):
        with pytest.raises(DataConfigError, match="und_split_steps"):
            DataConfig.from_dict({"und_split_steps": bad})


def test_train_step_lays_out_a_logical_batch_as_streams(bm):
    """A batch straight from ``packing.pack`` (logical order, no ``expert_split``) runs the expert-stream
    step: it compiles a program for a split (never ``select``), and its losses and updated params equal
    those of the same packs laid out by hand with the same split (same numbers, same order of sums:
    the host layout is the hand layout)."""
    from bagel_jax import sharding as shd
    from bagel_jax.train import optimizer as O, step as S

    logical = stream_test_batch(bm, overlap=True)
    # one pack per row of the mixed rows, padded to one length (as the loader pads its packs)
    t = packed(bm)
    caps = Capacities(rows=1, row_len=logical.shape[1], vit_tokens=t.vit_seg.shape[0], latent_tokens=t.vae_src.shape[0],
                      vae_images=t.vae_images.shape[0], vae_hw=t.vae_images.shape[1:3], ce_tokens=t.ce_index.shape[0])
    packs = [packing.pack([r], bm.tokenizer.special, bm.cfg, caps) for r in rows_mixed()]
    arrays = {k: np.stack([p.arrays()[k] for p in packs])[None] for k in packs[0].arrays()}   # [1, 2, ...]
    tc = O.TrainConfig(compute_dtype="float32", warmup_steps=0)
    mesh = shd.make_mesh(1, 1, 1)
    mask = O.trainable_mask(bm.params, tc)
    opt = O.make_optimizer(tc, mask, 10)
    step = S.make_train_step(bm.model, bm.vae, tc, mask, opt, O.lr_schedule(tc, 10), None)
    vae = bm.vae_params

    host, split = S.streams_from_logical(arrays)
    und, gen = zip(*(packing.expert_counts(p) for p in packs))
    assert split[0] == max(int(u.max()) for u in und)
    assert split[0] + split[1] >= logical.shape[1]
    by_hand = {k: np.stack([packing.to_expert_streams(p, *split)[0].arrays()[k] for p in packs])[None]
               for k in packs[0].arrays()}
    for k, v in by_hand.items():
        np.testing.assert_array_equal(host[k], v, err_msg=k)

    results = []
    _, ssh = S.init_state(bm.params, opt, 0, mesh)
    fn = S.jit_train_step(step, ssh, mesh, None)   # one program serves every call (same shapes and split)
    # logical batch; streams with the split given; streams carrying their expert_split array (the loader's
    # batches), which the step reads on the host
    for batch, explicit in ((arrays, None), (by_hand, split), (host, None)):
        state, _ = S.init_state(bm.params, opt, 0, mesh)
        state, m = fn(state, shd.put_batch(batch, mesh), vae, explicit)
        results.append((jax.device_get(m), jax.device_get(state["params"])))
    assert [k[1] for k in fn.cache] == [split]
    (m0, p0), *others = results
    for m1, p1 in others:
        for k in ("loss", "loss_ce", "loss_mse", "grad_norm"):
            np.testing.assert_array_equal(m0[k], m1[k], err_msg=k)
        for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(p1)):
            np.testing.assert_array_equal(a, b)


def test_unrolled_layer_loop_step_equals_scan(bm):
    """``train.layer_loop: unrolled`` runs the layer stacks as a Python loop: over params sliced from a
    stacked state inside the step (``unstack_layers``; the state keeps the scan layout, as the trainer's), or
    over the per-layer arrays of the state ``init_state`` builds by default on one CPU device. One step of
    either gives the scan step's losses and new params (the per-layer state restacked). Tolerance: the
    programs differ (other fusions, other summation order in the weight gradients), so float32 rounding may
    differ."""
    from bagel_jax import sharding as shd
    from bagel_jax.config import ConfigError
    from bagel_jax.nn import layer_loop
    from bagel_jax.train import optimizer as O, step as S

    t = packed(bm)
    caps = Capacities(rows=1, row_len=t.shape[1] + 8, vit_tokens=t.vit_seg.shape[0], latent_tokens=t.vae_src.shape[0],
                      vae_images=t.vae_images.shape[0], vae_hw=t.vae_images.shape[1:3], ce_tokens=t.ce_index.shape[0])
    packs = [packing.pack([r], bm.tokenizer.special, bm.cfg, caps) for r in rows_mixed()]
    arrays = {k: np.stack([p.arrays()[k] for p in packs])[None] for k in packs[0].arrays()}
    mesh = shd.make_mesh(1, 1, 1)
    out = {}
    for name, loop, layout in (("scan", "scan", "scan"), ("sliced", "unrolled", "scan"), ("perlayer", "auto", "auto")):
        tc = O.TrainConfig(compute_dtype="float32", warmup_steps=0, layer_loop=loop)
        mask = O.trainable_mask(bm.params, tc)
        opt = O.make_optimizer(tc, mask, 10)
        state, ssh = S.init_state(bm.params, opt, 0, mesh, layer_loop=layout)
        assert layer_loop.layout_of(state["params"]) == ("unrolled" if name == "perlayer" else "scan")
        assert S.resolve_layer_loop(tc, ssh["params"]) == ("scan" if name == "scan" else "unrolled")
        fn = S.jit_train_step(S.make_train_step(bm.model, bm.vae, tc, mask, opt, O.lr_schedule(tc, 10), None,
                                                ssh["params"]), ssh, mesh, None)
        state, m = fn(state, shd.put_batch(arrays, mesh), bm.vae_params)
        if name == "perlayer":   # restacked for the comparison; two steps: the state it returns runs again
            assert layer_loop.layout_of(state["params"]) == "unrolled"
            inner = state["opt_state"].inner_states["train"].inner_state[1][0]
            state = dict(state, params=layer_loop.stack(state["params"]), ema=layer_loop.stack(state["ema"]),
                         mu=layer_loop.stack(inner.mu))
        else:
            state = dict(state, mu=state["opt_state"].inner_states["train"].inner_state[1][0].mu)
        out[name] = jax.device_get((m, state))
        if name == "scan":
            per_layer, psh = S.init_state(bm.params, opt, 0, mesh)
            bad = S.jit_train_step(S.make_train_step(bm.model, bm.vae, tc, mask, opt, O.lr_schedule(tc, 10), None,
                                                     psh["params"]), psh, mesh, None)
            with pytest.raises(ValueError, match="per layer"):   # a per-layer state cannot run as a scan
                bad(per_layer, shd.put_batch(arrays, mesh), bm.vae_params)
    m0, s0 = out["scan"]
    for name in ("sliced", "perlayer"):
        m1, s1 = out[name]
        assert jax.tree_util.tree_structure(s0["params"]) == jax.tree_util.tree_structure(s1["params"])
        for k in ("loss", "loss_ce", "loss_mse", "grad_norm"):
            np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=f"{name} {k}")
        # the first Adam moment is (1 - beta1) x the clipped gradient: the gradients agree
        for a, b in zip(jax.tree_util.tree_leaves(s0["mu"]), jax.tree_util.tree_leaves(s1["mu"])):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
        # Adam's first step moves each weight by lr x sign(gradient): an entry whose gradient is ~0 may
        # take the other sign in the other program, so a weight may differ by up to 2 lr
        for key in ("params", "ema"):
            for a, b in zip(jax.tree_util.tree_leaves(s0[key]), jax.tree_util.tree_leaves(s1[key])):
                assert a.shape == b.shape
                np.testing.assert_allclose(b, a, rtol=0, atol=2 * O.TrainConfig().lr + 1e-6)
    assert O.TrainConfig().layer_loop == "auto"
    assert S.resolve_layer_loop(O.TrainConfig()) == "unrolled"   # one CPU device
    with pytest.raises(ConfigError, match="layer_loop"):
        O.TrainConfig.from_dict({"layer_loop": "loop"})


# -------------------------------------------------------------------------------------------------
# freeze_und: und activations detached, as the official trainer does (docs/architecture.md#training-optimisation-and-freezing)
# -------------------------------------------------------------------------------------------------

def _grads_of(bm, batch, noise, expert_split=None):
    """``(losses, grads)``: the CE and MSE losses and the gradient of each alone w.r.t. every parameter (no
    freezing mask), ``{"ce": {path: grad}, "mse": {...}}``."""
    arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}

    def f(params, arrays, noise):
        _, aux = train_forward(bm.model, params, bm.vae, bm.vae_params, arrays, noise, expert_split=expert_split)
        return jnp.stack([aux["ce"], aux["mse"]])

    fn = jax.jit(lambda *a: (f(*a), jax.jacrev(f)(*a)))
    vals, g = fn(bm.params, arrays, noise)
    flat = [("/".join(k.key for k in p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(g)]
    return np.asarray(vals), {name: {p: v[i] for p, v in flat} for i, name in enumerate(("ce", "mse"))}


def _is_und(path):
    """Parameters only und tokens use: the und expert of the decoder (not the LM head), the ViT, the connector."""
    if path.startswith(("vit_model/", "connector/")):
        return True
    return (path.startswith("language_model/") and "_moe_gen" not in path
            and not path.startswith("language_model/lm_head"))


def test_freeze_und_detaches_the_und_activations(bm):
    """With ``ModelOptions.freeze_und`` no gradient flows through und tokens: every und-only parameter gets
    exactly zero gradient from both losses (even without the optimiser's freezing mask), the CE loss reaches
    the LM head only, the MSE loss still trains the gen expert; losses are unchanged, and the stream layout
    (``Routing.split``) and the logical one (``Routing.select``) agree. Without the option the und expert gets
    gradients from both losses (gen tokens attend to und tokens, text attends to clean VAE images)."""
    import dataclasses

    frozen = dataclasses.replace(bm, model=bm.model.clone(opts=dataclasses.replace(bm.model.opts, freeze_und=True)))
    logical = stream_test_batch(bm, False)
    B, L = logical.shape
    U = int(packing.expert_counts(logical)[0].max())
    s, _ = packing.to_expert_streams(logical, U, L - U)
    noise = draw_noise(jax.random.PRNGKey(5), logical.arrays(), bm.cfg)
    vals_f, g = _grads_of(frozen, s, noise, (U, L - U))
    vals_0, g0 = _grads_of(bm, s, noise, (U, L - U))
    np.testing.assert_allclose(vals_f, vals_0, rtol=1e-6)
    g_ce, g_mse, g_ce0, g_mse0 = g["ce"], g["mse"], g0["ce"], g0["mse"]
    top = max(np.abs(v).max() for v in g_mse0.values())
    for p in g_ce:
        if p.startswith(("language_model/lm_head", "language_model/embed_tokens")) and not _is_und(p):
            continue
        assert not np.any(g_ce[p]), f"CE gradient reaches {p} through und tokens"
        if _is_und(p):
            assert not np.any(g_mse[p]), f"MSE gradient reaches und-only {p}"
    assert any(np.any(g_ce[p]) for p in g_ce if p.startswith("language_model/lm_head"))
    gen = [p for p in g_mse if "_moe_gen" in p and p.endswith("kernel")]
    assert gen and all(np.abs(g_mse[p]).max() > 1e-6 * top for p in gen), "the gen expert must still train"
    # without freeze_und both losses reach the und expert, and the CE reaches the gen expert through clean VAE images
    und = [p for p in g_ce0 if _is_und(p) and p.startswith("language_model/model/") and p.endswith("kernel")]
    assert und and all(np.any(g_ce0[p]) and np.any(g_mse0[p]) for p in und)
    assert any(np.any(g_ce0[p]) for p in gen)
    # the logical layout (both experts on every token, Routing.select) detaches the same rows
    _, g_sel = _grads_of(frozen, logical, noise)
    for which in ("ce", "mse"):
        for p, a in g[which].items():
            b = g_sel[which][p]
            assert np.any(a) == np.any(b), (which, p)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-3 * top), err_msg=p)
