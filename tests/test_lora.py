"""LoRA (docs/lora.md): a zero-B adapter is the base model, merged equals unmerged, gradients reach only the
adapter, and train.py with train.lora.* (int8 + bfloat16 base) trains, checkpoints only the adapter, resumes
bitwise and exports an adapter that merges into an official folder our loader reads."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax import lora as L
from bagel_jax import quantize as Q
from bagel_jax.config import ConfigError
from bagel_jax.convert.official import _flatten
from bagel_jax.loading import load_model
from bagel_jax.models.bagel import Bagel, param_shapes
from bagel_jax.models.qwen2_mot import Routing
from bagel_jax.nn.lora import DROPOUT_RNG, LoraDense
from bagel_jax.nn.mask import MaskVectors
from bagel_jax.train.optimizer import freeze
from train_helpers import make_data, metrics, run_train

LC = L.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base(tiny_a):
    return load_model(tiny_a, dtype=jnp.float32, with_tokenizer=False)


def _with(model, **kw):
    return model.clone(opts=dataclasses.replace(model.opts, **kw))


@jax.jit
def _inputs():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 12, 64))
    pos = jnp.arange(12)[None]
    return x, pos


def outputs(model, params):
    """LM logits and velocities ``[1, 12, vocab + 64]`` of 12 tokens, 6 und then 6 gen (both experts run)."""
    x, pos = _inputs()

    @jax.jit
    def f(p):
        vec = MaskVectors(jnp.ones_like(pos), pos, jnp.zeros_like(pos))
        h, _ = model.apply({"params": p}, x, pos, vec, Routing.split(6), method=Bagel.decode)
        return jnp.concatenate([model.apply({"params": p}, h, method=Bagel.lm_logits),
                                model.apply({"params": p}, h, method=Bagel.velocity)], -1)
    return np.asarray(f(params))


def random_b(adapter, scale=0.05):
    """The adapter with a random (non-zero) B, as after some training."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(jax.random.PRNGKey(len(p)), v.shape) * scale if p[-1].key == "lora_b" else v,
        adapter)


def test_zero_b_is_the_base_and_merge_equals_unmerged(base):
    shapes = param_shapes(base.model)
    ad = L.init_adapter(LC, shapes, jax.random.PRNGKey(0))
    assert all(not np.any(v) for p, v in _flatten(ad).items() if p[-1] == "lora_b")
    lora_model = _with(base.model, lora=True)
    ref = outputs(base.model, base.params)
    np.testing.assert_array_equal(outputs(lora_model, L.attach(base.params, ad, LC)), ref)   # float32: exact
    # int8 base: the adapted program fuses the int8 matmul's scale and bias differently, so equal to float
    # rounding (1 ulp of the largest logit), not bitwise
    qp = Q.quantize_params(base.params)
    qref = outputs(_with(base.model, quantize="int8"), qp)
    got = outputs(_with(base.model, quantize="int8", lora=True), L.attach(qp, ad, LC))
    assert np.abs(got - qref).max() <= 1e-6 * np.abs(qref).max()

    ad = random_b(ad)
    unmerged = outputs(lora_model, L.attach(base.params, ad, LC))
    assert np.abs(unmerged - ref).max() > 0.1                    # the adapter changes the model
    merged = outputs(base.model, L.merge(base.params, ad, LC))
    # W + s*A@B vs x@W + s*(x@A)@B: the same sums in another order (float32)
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_gradients_reach_only_the_adapter(base):
    lc = L.LoraConfig(rank=2, targets=("q", "v", "down"), experts="gen")
    ad = random_b(L.init_adapter(lc, param_shapes(base.model), jax.random.PRNGKey(0)))
    mods = {"/".join(p[4:-1]) for p in _flatten(ad)}
    assert mods == {"q_proj_moe_gen", "v_proj_moe_gen", "mlp_moe_gen/down_proj"}
    model = _with(base.model, lora=True)
    params = L.attach(base.params, ad, lc)
    mask = L.combine(jax.tree_util.tree_map(lambda _: False, base.params), jax.tree_util.tree_map(lambda _: True, ad))
    x, pos = _inputs()

    def loss(p):     # as train/lora.py: the base under stop_gradient, the adapter trained
        vec = MaskVectors(jnp.ones_like(pos), pos, jnp.zeros_like(pos))
        h, _ = model.apply({"params": freeze(p, mask)}, x, pos, vec, Routing.split(6), method=Bagel.decode)
        return jnp.sum(model.apply({"params": freeze(p, mask)}, h, method=Bagel.velocity) ** 2)

    g = _flatten(jax.jit(jax.grad(loss))(params))
    adapter_leaves = {p for p in g if p[-1] in ("lora_a", "lora_b")}
    assert adapter_leaves == set(_flatten(ad))
    for p, v in g.items():
        if p in adapter_leaves:
            assert np.all(np.abs(np.asarray(v)).reshape(v.shape[0], -1).max(-1) > 0), p   # every layer's A and B
        else:
            assert not np.any(np.asarray(v)), p


def test_dropout_only_with_its_rng():
    layer = LoraDense(3, dropout=0.5)
    x = jnp.ones((2, 8))
    p = dict(kernel=jnp.ones((8, 3)), bias=jnp.zeros(3), lora_a=jnp.ones((8, 2)), lora_b=jnp.ones((2, 3)))
    plain = layer.apply({"params": p}, x)
    np.testing.assert_array_equal(plain, 8 + 16)
    dropped = layer.apply({"params": p}, x, rngs={DROPOUT_RNG: jax.random.PRNGKey(0)})
    assert not np.array_equal(dropped, plain) and np.all(np.asarray(dropped) != 8 + 16)


def test_config_errors():
    assert L.LoraConfig.from_dict(dict(rank=8, targets="q,v", experts="gen")).targets == ("q", "v")
    for bad, msg in ((dict(rank=-1), "rank"), (dict(rank=4, targets=["qq"]), "targets"), (dict(rank=4, experts="x"), "experts"),
                     (dict(rank=4, dropout=1.0), "dropout"), (dict(rank=4, alpha=0), "alpha"), (dict(rnk=4), "unknown")):
        with pytest.raises(ConfigError, match=msg):
            L.LoraConfig.from_dict(bad)


# ------------------------------------------------------------------------------------------------
# train.py: int8 + bfloat16 base, adapter-only checkpoints, bitwise resume, export -> merge -> load
# ------------------------------------------------------------------------------------------------

def _lora_args(tiny_a):
    return ("train.lora.rank=4", "train.lora.alpha=8", "train.lora.quantize=int8", "train.compute_dtype=bfloat16",
            f"train.init={tiny_a}", "train.save_every=2", "train.lr=1e-2", "train.warmup_steps=0",
            "data.und_split_steps=1")   # one expert split: one compiled step program


@pytest.fixture(scope="module")
def run(tiny_a, tmp_path_factory):
    data = make_data(str(tmp_path_factory.mktemp("syn")), num=24, bad=0)
    wd, out = str(tmp_path_factory.mktemp("run")), str(tmp_path_factory.mktemp("adapter"))
    p = run_train(data, wd, 4, *_lora_args(tiny_a), "--export", out)
    assert "LoRA rank 4" in p.stdout and "int8" in p.stdout
    return data, wd, out


def test_lora_run_trains_the_adapter_only_and_resumes_bitwise(run, base, tiny_a, tmp_path):
    from bagel_jax.train.run_checkpoint import load_train_state

    data, wd, _ = run
    assert [r["step"] for r in metrics(wd)] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in metrics(wd))
    state = load_train_state(os.path.join(wd, "checkpoints"))
    names = {"/".join(p) for p in _flatten(state["params"])}
    want = {"/".join(p) for p in _flatten(L.adapter_shapes(LC, param_shapes(base.model)))}
    assert names == want                            # the checkpointed params are the adapter, nothing else
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(state["params"]))
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(state["opt_state"])) <= 2 * n + 8   # Adam moments of the adapter
    assert all(np.any(np.asarray(v)) for p, v in _flatten(state["params"]).items() if p[-1] == "lora_b")   # B trained

    # resume: the step-2 checkpoint in a copy of the run, continued to step 4, is the uninterrupted run's step 4
    wd2 = str(tmp_path / "resumed")
    shutil.copytree(wd, wd2)
    shutil.rmtree(os.path.join(wd2, "checkpoints", "4"))
    p = run_train(data, wd2, 4, *_lora_args(tiny_a))
    assert "resumed from step 2" in p.stdout
    a, b = state, load_train_state(os.path.join(wd2, "checkpoints"))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_export_merge_load(run, base, tiny_a, tmp_path):
    from bagel_jax.cli.merge_lora import main as merge_main
    from bagel_jax.inference.api import load

    _, _, out = run
    assert sorted(os.listdir(out)) == [L.CONFIG_FILE, L.WEIGHTS_FILE]
    ad, lc = L.load_adapter(out, base.cfg, param_shapes(base.model))
    assert lc == LC
    unmerged = outputs(_with(base.model, lora=True), L.attach(base.params, ad, lc))
    assert merge_main([tiny_a, out, str(tmp_path / "merged")]) == 0
    merged = load_model(str(tmp_path / "merged"), dtype=jnp.float32)
    np.testing.assert_allclose(outputs(merged.model, merged.params), unmerged, rtol=0,
                               atol=2e-5 * np.abs(unmerged).max())   # float32 sums in another order
    # load(folder, lora=): the adapter unmerged in the inference engine (unrolled layers on one CPU device)
    eng = load(tiny_a, dtype="float32", lora=out).engine
    assert eng.model.opts.lora and eng.model.opts.layer_loop == "unrolled"
    np.testing.assert_allclose(outputs(eng.model, eng.params), unmerged, rtol=0, atol=2e-5 * np.abs(unmerged).max())
