"""The two layouts of the layer stacks (bagel_jax/nn/layer_loop.py): scanned over stacked weights, or an
unrolled loop over per-layer weights. Same model, same numbers; conversion both ways; the engine's choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.images import ImageTransform
from bagel_jax.inference import api, blocks
from bagel_jax.inference.context import Context
from bagel_jax.inference.sampler import ImageParams, generate_images
from bagel_jax.loading import load_model
from bagel_jax.images import patchify
from bagel_jax.nn import layer_loop
from bagel_jax.nn.options import ModelOptions

SMALL_VAE = ImageTransform(256, 32, 16)
SMALL_VIT = ImageTransform(256, 28, 14)


@pytest.fixture(scope="module")
def pipes(tiny_a):
    kw = dict(dtype="float32", inference=api.InferenceOptions(SMALL_VAE, SMALL_VIT))
    return {loop: api.load(tiny_a, layer_loop=loop, **kw) for loop in ("scan", "unrolled")}


def test_convert_both_ways(tiny_a):
    p = load_model(tiny_a, dtype=jnp.float32).params
    n = p["language_model"]["model"]["layers"]["layer"]["q_proj"]["kernel"].shape[0]
    u = layer_loop.unstack(p)
    assert layer_loop.layout_of(p) == "scan" and layer_loop.layout_of(u) == "unrolled"
    lm = u["language_model"]["model"]
    assert "layers" not in lm and sorted(k for k in lm if k.startswith("layers_")) == [f"layers_{i}" for i in range(n)]
    np.testing.assert_array_equal(lm["layers_1"]["layer"]["q_proj"]["kernel"],
                                  p["language_model"]["model"]["layers"]["layer"]["q_proj"]["kernel"][1])
    assert (u["language_model"]["embed_tokens"]["embedding"] is
            p["language_model"]["embed_tokens"]["embedding"])      # arrays outside the stacks are shared, not copied
    back = layer_loop.stack(u)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(p)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, p)


def test_like_lays_a_per_stack_tree_out_as_the_params():
    """A tree of per-leaf values of the scan layout (a trainable mask, optimiser labels) serves per-layer params:
    each layer gets the stack's values; a tree already in the params' layout comes back unchanged."""
    stacked = {"lm": {"layers": {"q": jnp.zeros((3, 2)), "norm": jnp.zeros((3,))}, "embed": jnp.zeros((4, 2))}}
    mask = {"lm": {"layers": {"q": True, "norm": False}, "embed": True}}
    per_layer = layer_loop.unstack(stacked)
    m = layer_loop.like(mask, per_layer)
    assert sorted(m["lm"]) == ["embed", "layers_0", "layers_1", "layers_2"]
    assert all(m["lm"][f"layers_{i}"] == {"q": True, "norm": False} for i in range(3)) and m["lm"]["embed"] is True
    assert jax.tree_util.tree_structure(m) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(lambda _: True, per_layer))
    assert layer_loop.like(mask, stacked) == mask
    assert layer_loop.like(m, per_layer) == m
    with pytest.raises(KeyError):
        layer_loop.like({"lm": {"layers": {"q": True}}}, per_layer)    # a leaf the tree does not name


def test_relayout_moves_a_whole_train_state_between_layouts():
    """relayout (the trainer's checkpoint <-> step layouts) enters optax's state tuples, which unstack / stack do
    not: per-layer moments are the slices of the stacked ones, a masked-out subtree (no leaves) is no
    obstacle, and the way back is exact."""
    import optax

    stacked = {"lm": {"layers": {"q": jnp.arange(6.0).reshape(3, 2), "norm": jnp.ones((3,))}, "embed": jnp.ones((4, 2))}}
    mask = {"lm": {"layers": {"q": True, "norm": False}, "embed": True}}
    opt = optax.masked(optax.adam(0.1), lambda p: layer_loop.like(mask, p))

    def make(p):
        return {"params": p, "opt": opt.init(p), "step": jnp.int32(0)}

    state = make(stacked)
    state["opt"] = opt.update(stacked, state["opt"], stacked)[1]     # non-zero moments
    target = jax.eval_shape(lambda p: make(layer_loop.unstack(p)), stacked)
    per_layer = layer_loop.relayout(state, target)
    assert jax.tree_util.tree_structure(per_layer) == jax.tree_util.tree_structure(target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, per_layer["params"], layer_loop.unstack(stacked))
    mu = state["opt"].inner_state[0].mu["lm"]["layers"]["q"]
    for i in range(3):
        np.testing.assert_array_equal(per_layer["opt"].inner_state[0].mu["lm"][f"layers_{i}"]["q"], mu[i])
    back = layer_loop.relayout(per_layer, jax.eval_shape(lambda: state))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, state)
    with pytest.raises(KeyError):
        layer_loop.relayout({"params": stacked}, target)                 # no optimiser state to lay out


def test_own_optimiser_with_a_stacked_labels_tree_is_a_clear_error():
    """init_state's per-layer default on one CPU device: an optax optimiser whose labels tree names the stacked
    layout gets our error naming both ways out (not optax's tree-structure message); both ways work."""
    import optax

    from bagel_jax import sharding as shd
    from bagel_jax.train import step as S

    mesh = shd.make_mesh(**shd.parse_mesh("data=1,fsdp=1,tensor=1"))
    p = {"lm": {"layers": {"q": jnp.ones((3, 2)), "norm": jnp.ones((3,))}, "embed": jnp.ones((4, 2))}}
    labels = {"lm": {"layers": {"q": "train", "norm": "freeze"}, "embed": "train"}}
    parts = {"train": optax.adam(0.1), "freeze": optax.set_to_zero()}
    if layer_loop.resolve("auto", mesh) == "unrolled":
        with pytest.raises(ValueError, match="layer_loop.like"):
            S.init_state(p, optax.multi_transform(parts, labels), 0, mesh)
    state, _ = S.init_state(p, optax.multi_transform(parts, labels), 0, mesh, layer_loop="scan")
    assert layer_loop.layout_of(state["params"]) == "scan"
    state, _ = S.init_state(p, optax.multi_transform(parts, lambda q: layer_loop.like(labels, q)), 0, mesh,
                            layer_loop="unrolled")
    assert layer_loop.layout_of(state["params"]) == "unrolled"


def test_consume_frees_the_stacked_arrays(tiny_a):
    p = load_model(tiny_a, dtype=jnp.float32).params
    k = p["language_model"]["model"]["layers"]["layer"]["q_proj"]["kernel"]
    want = np.asarray(k[0])
    u = layer_loop.unstack(p, consume=True)
    assert k.is_deleted()
    np.testing.assert_array_equal(u["language_model"]["model"]["layers_0"]["layer"]["q_proj"]["kernel"], want)


def test_choice_and_errors():
    assert layer_loop.resolve("auto") == ("unrolled" if jax.default_backend() == "cpu" else "scan")
    assert layer_loop.resolve("scan") == "scan"
    with pytest.raises(ValueError, match="layer loop"):
        layer_loop.resolve("python")
    with pytest.raises(ValueError, match="layer loop"):
        ModelOptions(layer_loop="unroll")
    with pytest.raises(ValueError, match="numbered"):
        layer_loop.stack({"layers_0": {"w": jnp.zeros(2)}, "layers_2": {"w": jnp.zeros(2)}})


def test_engine_layouts(pipes):
    scan, unr = pipes["scan"].engine, pipes["unrolled"].engine
    assert scan.model.opts.layer_loop == "scan" and layer_loop.layout_of(scan.params) == "scan"
    assert unr.model.opts.layer_loop == "unrolled" and layer_loop.layout_of(unr.params) == "unrolled"
    assert unr.bm.params is unr.params and unr.bm.model is unr.model


def _img(seed=0):
    return (np.random.RandomState(seed).rand(40, 48, 3) * 255).astype(np.uint8)


def test_same_numbers_in_both_layouts(pipes):
    """ViT + text prefill (with every layer's output), a flow velocity and a short sampling run: the unrolled
    loop computes what the scan does (float32, 1e-5 of scale: XLA may fuse the two programs differently)."""
    out = {}
    for loop, pipe in pipes.items():
        eng = pipe.engine
        ctx = Context.new(eng, 1).add_image(_img(), vae=True, vit=True).add_text("What is this?")
        br = ctx.gen
        pre = eng.preprocess(_img(1), vae=False, vit=True)
        ids = jnp.asarray([eng.tok.encode("a cat")], jnp.int32)
        pos = br.rope[:, None] + jnp.arange(ids.shape[1])[None]
        h, _, inter = blocks.text_chunk(eng.model, eng.params, br.cache, ids, pos, jnp.asarray([ids.shape[1]]),
                                        update=False, collect=True)
        img = generate_images(Context.new(eng, 1).add_text("a red cat"), (32, 32),
                              ImageParams(num_timesteps=3), keys=[jax.random.PRNGKey(0)], decode=False)
        out[loop] = dict(cache=np.asarray(br.cache.k[:, :, :int(br.length[0])]), h=np.asarray(h),
                         hidden=np.asarray(inter["hidden"]), lat=np.asarray(img["latent_tokens"]))
        assert pre["vit"].ndim == 3
    for key in out["scan"]:
        a, b = out["scan"][key], out["unrolled"][key]
        assert a.shape == b.shape, key
        np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(np.abs(a).max())), rtol=0, err_msg=key)
    n = pipes["scan"].engine.cfg.llm.num_hidden_layers
    assert out["unrolled"]["hidden"].shape[0] == n


def test_vit_layers_sown_in_both_layouts(pipes):
    from bagel_jax.nn import intermediates

    res = {}
    for loop, pipe in pipes.items():
        eng = pipe.engine
        pre = eng.preprocess(_img(), vae=False, vit=True)
        vcfg = eng.cfg.vit
        tok, pos = patchify(pre["vit"], vcfg.patch_size, eng.cfg.vit_max_num_patch_per_side)
        patches, pos = jnp.asarray(tok)[None], jnp.asarray(pos, jnp.int32)[None]
        n = patches.shape[1]
        from bagel_jax.models.bagel import Bagel

        _, inter = intermediates.apply(eng.model, {"params": eng.params}, patches, pos,
                                       jnp.ones((1, n), jnp.int32), method=Bagel.embed_vit)
        res[loop] = np.asarray(inter["vit_layers"])
    assert res["scan"].shape == res["unrolled"].shape
    assert res["scan"].shape[0] == pipes["scan"].engine.cfg.vit.num_hidden_layers
    np.testing.assert_allclose(res["unrolled"], res["scan"], atol=1e-5 * max(1.0, float(np.abs(res["scan"]).max())))
