"""CFG as data (bagel_jax.inference.cfg): the plan says which branches run and how they combine.

A new guidance mode is added here by registering one CfgMode (the CFG module's table) and nothing else;
generation on the tiny-a model then follows it, checked against a hand computation from the per-branch
velocities. Plus the plan's branch dedup, and the CFG-off path against the all-branches form.
"""


import jax.numpy as jnp
import numpy as np
import pytest

from bagel_jax.images import ImageTransform
from bagel_jax.inference import api, blocks, cfg, sampler
from bagel_jax.inference.cfg import CFG_MODES, CfgMode, ImageParams, make_plan
from bagel_jax.inference.context import Context

HW = (32, 32)


@pytest.fixture(scope="module")
def pipe(tiny_a):
    return api.load(tiny_a, dtype="float32", inference=api.InferenceOptions(ImageTransform(256, 32, 16),
                                                                       ImageTransform(256, 28, 14)))


def _edit_context(pipe):
    img = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    return Context.new(pipe.engine, 1).add_image(img).add_text("Make it red.")


def test_plan_runs_equal_branches_once():
    a, b = object(), object()
    ip = ImageParams(cfg_img_scale=1.5)
    plan, rows = make_plan(ip, {"gen": a, "cfg_text": b, "cfg_img": a})          # plain T2I: cfg_img is gen
    assert plan.names == ("gen", "cfg_text", "cfg_img") and plan.rows == (0, 1, 0) and rows == [a, b]
    plan, rows = make_plan(ImageParams(), {"gen": a, "cfg_text": b, "cfg_img": object()})   # image CFG off
    assert plan.names == ("gen", "cfg_text") and plan.n_rows == 2
    plan, rows = make_plan(ImageParams(cfg_text_scale=1.0, cfg_img_scale=2.0), {"gen": a, "cfg_text": b, "cfg_img": b})
    assert plan.names == ("gen",) and not plan.guided and rows == [a]   # image CFG needs text CFG (official)
    plan, _ = make_plan(ImageParams(), {"gen": a})                       # a context without guidance branches
    assert not plan.guided
    with pytest.raises(ValueError, match="cfg_mode"):
        ImageParams(cfg_mode="nope").validate()


def _image_only_combine(v, st, si, renorm_type, renorm_min):
    del st, renorm_type, renorm_min
    return v["cfg_img"] + si * (v["gen"] - v["cfg_img"])


def test_new_mode_image_only_guidance(pipe, monkeypatch):
    """Image-only guidance, defined here: one CfgMode in CFG_MODES. Its step velocity must equal
    ``v_img + s_i (v - v_img)`` from the gen and cfg_img velocities computed one branch at a time, inside
    ``cfg_interval``, and ``v`` outside it; the cfg_text branch is not run."""
    mode = CfgMode(needs=lambda p: ("cfg_img",) if p.cfg_img_scale > 1.0 else (), combine=_image_only_combine)
    monkeypatch.setitem(CFG_MODES, "image_only", mode)
    c = _edit_context(pipe)
    ip = ImageParams.edit(cfg_mode="image_only", cfg_img_scale=2.0, num_timesteps=3, cfg_interval=(0.8, 1.0))
    out = sampler.generate_images(c, HW, ip, record=True, decode=False)
    assert out["plan"].names == ("gen", "cfg_img") and out["n_branches"] == 2
    eng = pipe.engine
    lat_pos = jnp.asarray(blocks.latent_grid(2, 2, eng.cfg.max_latent_size))[None]

    def branch_v(br, x, t):
        return np.asarray(blocks.velocity(eng.model, eng.params, br.cache, jnp.asarray(x), t, lat_pos,
                                               jnp.asarray(br.rope, jnp.int32), eng.markers)[0])

    sig = out["sigmas"]
    active = [bool(cfg.cfg_active(s, ip.cfg_interval)) for s in sig[:-1]]
    assert active == [True, False]                                   # one guided step, one conditional step
    for k in range(2):
        x = out["x_t"][k]
        vg, vi = branch_v(c.gen, x, sig[k]), branch_v(c.cfg_img, x, sig[k])
        want = vi + 2.0 * (vg - vi) if active[k] else vg
        if active[k]:
            assert np.abs(want - vg).max() > 1e-3                   # guidance really changes the step
        # per-branch calls (batch 1) vs one stacked call (batch 2): float reduction order only
        np.testing.assert_allclose(out["v"][k], want, rtol=1e-5, atol=1e-5)
    # and the official mode on the same context is something else (it also runs cfg_text)
    off = sampler.generate_images(c, HW, ImageParams.edit(num_timesteps=3, cfg_interval=(0.8, 1.0)), decode=False)
    assert off["plan"].names == ("gen", "cfg_text", "cfg_img") and off["n_branches"] == 3
    assert np.abs(off["latent_tokens"] - out["latent_tokens"]).max() > 1e-3


def test_guidance_step():
    """CfgPlan.step, the one guidance step of every sampler: inside the interval the mode's combination of every
    row block's velocity (the model asked for all rows), outside it the gen rows alone (the model asked for one
    row block with "cond"); "cond" and "where" agree; an unguided plan asks for one row block and returns it."""
    a, b = object(), object()
    ip = ImageParams(cfg_text_scale=3.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="channel", cfg_renorm_min=1.0)
    plan, _ = make_plan(ip, {"gen": a, "cfg_text": b, "cfg_img": object()})
    assert plan.names == ("gen", "cfg_text")
    g = cfg.Guidance.of(ip)
    vs = jnp.asarray(np.random.RandomState(0).randn(2, 1, 3, 4), jnp.float32)     # [rows, B, N, C]
    asked = []

    def velocity(rows):
        asked.append(rows)
        return vs[:rows]

    want = np.asarray(vs[1] + 3.0 * (vs[0] - vs[1]))                             # renorm_min 1: no renorm
    for cfg_off in ("cond", "where"):
        asked.clear()
        np.testing.assert_allclose(plan.step(velocity, 0.9, g, cfg_off), want, rtol=1e-6)
        np.testing.assert_array_equal(plan.step(velocity, 0.3, g, cfg_off), vs[0])
        assert asked == ([2, 1, 2, 1] if cfg_off == "cond" else [2, 2])          # lax.cond traces both calls
    np.testing.assert_allclose(plan.guide(vs, 0.9, g), want, rtol=1e-6)
    np.testing.assert_array_equal(plan.guide(vs, 0.3, g), vs[0])
    assert bool(plan.active(0.9, g)) and not bool(plan.active(0.4, g))           # lo < sigma <= hi
    unguided, _ = make_plan(ImageParams(cfg_text_scale=1.0), {"gen": a, "cfg_text": b, "cfg_img": b})
    asked.clear()
    np.testing.assert_array_equal(unguided.step(velocity, 0.9, g), vs[0])
    assert asked == [1] and not bool(unguided.active(0.9, g))
