"""TaylorSeer step caching (bagel_jax.inference.taylorseer; docs/architecture.md#taylorseer) on the tiny-a model.

The step types, branch steps and factor counts of every branch are checked against a plain-Python copy
of the reference rule for every kind of CFG interval (from the first step, starting later, covering
everything, empty, unguided, with an image branch equal to gen); the Taylor-step layer outputs against
the expansion recomputed from the full steps' outputs; caching that never skips against the uncached
sampler; batched against one row at a time; and that nothing leaks into later calls. The official run
itself (``tests/fixtures/tiny-a-taylorseer``) is checked by ``tests/test_verify_cli.py``.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from bagel_jax.images import ImageTransform
from bagel_jax.inference import api, cfg
from bagel_jax.inference.cfg import ImageParams
from bagel_jax.inference.context import Context
from bagel_jax.inference.sampler import generate_images
from bagel_jax.inference.taylorseer import TaylorSeer

HW = (32, 32)
STEPS = 20


@pytest.fixture(scope="module")
def pipe(tiny_a):
    return api.load(tiny_a, dtype="float32", inference=api.InferenceOptions(ImageTransform(256, 32, 16),
                                                                       ImageTransform(256, 28, 14)))


@pytest.fixture(scope="module")
def ctx(pipe):
    return Context.new(pipe.engine, 1).add_text("A red cat sits on the blue mat.")


class RefBranch:
    """The reference's per-branch state, written from docs/architecture.md#taylorseer (lists, not arrays)."""

    def __init__(self, fresh_threshold=3, first_enhance=5, max_order=6):
        self.ft, self.fe, self.mo = fresh_threshold, first_enhance, max_order
        self.step, self.counter, self.activated, self.cache = 0, 0, [0], []

    def forward(self, f=None):
        """One call of the branch; ``f`` the real output (used on full steps). Returns (full, step, n, out)."""
        s = self.step
        full = s < self.fe or self.counter == self.ft - 1
        if full:
            self.counter = 0
            self.activated.append(s)
            new = [f]
            for i in range(self.mo):
                if i < len(self.cache) and s > self.fe - 2:
                    new.append((new[i] - self.cache[i]) / (self.activated[-1] - self.activated[-2]))
                else:
                    break
            self.cache, out = new, f
        else:
            self.counter += 1
            x = s - self.activated[-1]
            out = sum((1 / math.factorial(i)) * d * x ** i for i, d in enumerate(self.cache))
        self.step += 1
        return full, s, len(self.cache), out


def _reference_schedule(active, guided):
    """Per step and branch ("cond", "cfg"): (full, branch step, n factors) or None where not run."""
    cond, unc, rows = RefBranch(), RefBranch(), []
    for a in active:
        row = {"cond": cond.forward(0.0)[:3]}
        row["cfg"] = unc.forward(0.0)[:3] if (a and guided) else None
        rows.append(row)
    return rows


INTERVALS = {
    "from_the_first_step": dict(cfg_interval=(0.4, 1.0)),
    "starting_later": dict(cfg_interval=(0.0, 0.6)),
    "every_step": dict(cfg_interval=(0.0, 1.0)),
    "in_the_middle": dict(cfg_interval=(0.3, 0.8)),
    "empty": dict(cfg_interval=(1.0, 1.0)),
    "unguided": dict(cfg_text_scale=1.0),
    "image_branch_equal_to_gen": dict(cfg_img_scale=2.0, cfg_interval=(0.0, 0.6)),
}


@pytest.mark.parametrize("case", sorted(INTERVALS))
def test_schedule_follows_the_reference_rule(pipe, ctx, case):
    ip = ImageParams(num_timesteps=STEPS, step_cache="taylorseer", **INTERVALS[case])
    out = generate_images(ctx, HW, ip, record=True, decode=False)
    plan, rec = out["plan"], out["branch"]
    active = [bool(cfg.cfg_active(s, ip.cfg_interval)) for s in out["sigmas"][:-1]]
    np.testing.assert_array_equal(rec["active"], np.array(active) & plan.guided)
    ref = _reference_schedule(active, plan.guided)
    for name in plan.names:
        row = plan.rows[plan.names.index(name)]
        key = "cond" if name == "gen" else "cfg"
        for k, r in enumerate(ref):
            got = (rec["full"][k, row], rec["step"][k, row], rec["n_valid"][k, row])
            want = r[key]
            if want is None:          # a guidance branch off its steps (its row block may be gen's)
                assert name != "gen" and (row == 0 or got == (-1, -1, -1)), (case, name, k, got)
            else:
                assert got == (int(want[0]), want[1], want[2]), (case, name, k, got, want)
    assert (rec["full"][:, 0] == 0).any()                       # gen had Taylor steps
    if case == "image_branch_equal_to_gen":     # runs on later steps than gen: its own row block and state
        assert plan.rows[plan.names.index("cfg_img")] != 0


def test_taylor_steps_are_the_expansion_of_the_full_steps(pipe, ctx):
    """Every layer's Taylor-step output equals the reference expansion of the recorded full-step outputs
    (fed through :class:`RefBranch`), for both branches; the full steps are real decoder outputs."""
    ip = ImageParams(num_timesteps=STEPS, step_cache="taylorseer")
    out = generate_images(ctx, HW, ip, record=True, decode=False, taylorseer_rule=TaylorSeer(all_layers=True))
    rec = out["branch"]
    for row in range(out["plan"].n_rows):
        ref = RefBranch()
        for k in range(STEPS - 1):
            full = rec["full"][k, row]
            if full < 0:
                continue
            lay = rec["layer_out"][k, row].astype(np.float64)          # [L, B, Lq, D]
            is_full, _, _, want = ref.forward(lay)
            assert is_full == bool(full)
            if not is_full:
                np.testing.assert_allclose(lay, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)
        assert (rec["full"][:, row] == 0).sum() >= 6                  # there were Taylor steps to check


def test_caching_off_and_never_skipping_equal_the_uncached_sampler(pipe, ctx):
    base = generate_images(ctx, HW, ImageParams(num_timesteps=8), record=True)
    again = generate_images(ctx, HW, ImageParams(num_timesteps=8, step_cache="none"), record=True)
    np.testing.assert_array_equal(base["latent_tokens"], again["latent_tokens"])
    never = TaylorSeer(first_enhance=100)           # every step full: the cache machinery, no prediction
    ts = generate_images(ctx, HW, ImageParams(num_timesteps=8, step_cache="taylorseer"), record=True,
                         taylorseer_rule=never)
    assert (ts["branch"]["full"] != 0).all()
    np.testing.assert_allclose(ts["latent_tokens"], base["latent_tokens"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ts["image"], base["image"])
    cached = generate_images(ctx, HW, ImageParams(num_timesteps=STEPS, step_cache="taylorseer"))
    plain = generate_images(ctx, HW, ImageParams(num_timesteps=STEPS))
    diff, scale = np.abs(cached["latent_tokens"] - plain["latent_tokens"]).max(), np.abs(plain["latent_tokens"]).max()
    assert 0 < diff < 0.5 * scale                   # an approximation: close, not equal
    after = generate_images(ctx, HW, ImageParams(num_timesteps=8))   # no state survives a call (reference defect)
    np.testing.assert_array_equal(after["latent_tokens"], base["latent_tokens"])


def test_batched_equals_one_at_a_time(pipe):
    prompts = ["A red cat sits on the blue mat.", "a green star on the top"]
    ip = ImageParams(num_timesteps=12, step_cache="taylorseer")
    both = generate_images(Context.new(pipe.engine, 2).add_text(prompts), HW, ip)
    for i, p in enumerate(prompts):
        one = generate_images(Context.new(pipe.engine, 1).add_text(p), HW, ip, keys=[jax.random.PRNGKey(i)])
        np.testing.assert_allclose(both["latent_tokens"][i], one["latent_tokens"][0], atol=1e-5, rtol=0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="step_cache"):
        ImageParams(step_cache="teacache").validate()
    with pytest.raises(ValueError, match="TaylorSeer"):
        TaylorSeer(fresh_threshold=0)
    assert dataclasses.replace(ImageParams(), step_cache="taylorseer").validate().step_cache == "taylorseer"
