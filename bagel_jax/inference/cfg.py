"""Classifier-free guidance as data (docs/architecture.md: inference contexts and CFG branches, flow sampling,
default hyperparameters).

Everything about CFG lives here:

* :data:`BRANCH_RULES`: the named guidance branches a context keeps beside ``gen`` (the conditional one),
  and how each follows a context event. :class:`~bagel_jax.inference.context.Context` applies them.
* :class:`ImageParams`: the sampling hyperparameters and their only defaults (``cfg_mode`` names the mode).
* :data:`CFG_MODES`: a mode says which branches it needs for given params and how their velocities combine.
* :func:`make_plan` -> :class:`CfgPlan`: the branches one sampling call runs (equal branches once) and
  the combination; the sampler (:mod:`bagel_jax.inference.sampler`) just follows the plan.

A new mode is one :class:`CfgMode` in :data:`CFG_MODES` (and a new branch, if it needs one, one row of
:data:`BRANCH_RULES`); nothing else changes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

RENORM_TYPES = ("global", "channel", "text_channel")
STEP_CACHES = ("none", "taylorseer")     # the sampler's step caches (bagel_jax.inference.taylorseer)

# Guidance branches by name, and what each does on a context event
# (docs/architecture.md#inference-contexts-and-cfg-branches):
#   events: "text" (a user or system text), "think" (generated thinking text), "image" (an input image);
#   actions: "keep" (unchanged), "extend" (gets the event's tokens too), "gen_before" / "gen_after"
#   (becomes a snapshot of gen taken before / after the event).
BRANCH_RULES: dict[str, dict[str, str]] = {
    "cfg_text": {"text": "gen_before", "think": "keep", "image": "gen_after"},   # all but the last text
    "cfg_img": {"text": "extend", "think": "keep", "image": "keep"},             # no image, no thinking
}


def combine_cfg(v: jax.Array, v_text: jax.Array, v_img: Optional[jax.Array], text_scale, img_scale,
                renorm_type: str = "global", renorm_min: float = 0.0,
                token_mask: Optional[jax.Array] = None) -> jax.Array:
    """Combine conditional / text-unconditional / image-unconditional velocities (official text + image CFG).

    Args:
      v, v_text, v_img: ``[batch, tokens, C]`` (``v_img`` may be None when image CFG is off).
      text_scale, img_scale: scalars or ``[batch]`` arrays; the *active* scales for this step (pass
        1.0 outside ``cfg_interval``). Text CFG acts iff ``text_scale > 1``; image CFG only acts when
        text CFG does (official behaviour).
      renorm_type: "global" (norm over all tokens and channels of a row), "channel" (per token) or
        "text_channel" (renormalise only the text-guided part, per token; no renorm after image CFG).
      token_mask: ``[batch, tokens]`` bool of real latent tokens (padding excluded from global norms).
    Returns ``[batch, tokens, C]``.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type {renorm_type!r} is not one of {RENORM_TYPES}")
    f32 = jnp.float32
    v, v_text = v.astype(f32), v_text.astype(f32)
    st = jnp.asarray(text_scale, f32).reshape(-1, 1, 1)
    si = jnp.asarray(img_scale, f32).reshape(-1, 1, 1)
    use_img = (si > 1.0) if v_img is not None else jnp.zeros_like(si, bool)
    v_img = v_text if v_img is None else v_img.astype(f32)
    tok = jnp.ones(v.shape[:2], bool) if token_mask is None else token_mask

    def norm(x, per_token):
        if per_token:
            return jnp.linalg.norm(x, axis=-1, keepdims=True)
        sq = jnp.where(tok[..., None], x * x, 0.0).sum(axis=(1, 2), keepdims=True)
        return jnp.sqrt(sq)

    u = v_text + st * (v - v_text)
    if renorm_type == "text_channel":
        r = jnp.clip(norm(v, True) / (norm(u, True) + 1e-8), renorm_min, 1.0)
        u = u * r
        out = jnp.where(use_img, v_img + si * (u - v_img), u)
    else:
        w = jnp.where(use_img, v_img + si * (u - v_img), u)
        per_token = renorm_type == "channel"
        r = jnp.clip(norm(v, per_token) / (norm(w, per_token) + 1e-8), renorm_min, 1.0)
        out = w * r
    return jnp.where(st > 1.0, out, v)


@dataclasses.dataclass(frozen=True)
class CfgMode:
    """A guidance mode.

    ``needs(params)``: the guidance branches (names of :data:`BRANCH_RULES`) used with these params;
    ``()`` samples unguided. ``combine(v, text_scale, img_scale, renorm_type, renorm_min)``: ``v`` maps
    ``"gen"`` and every needed name to its velocity ``[B, N, C]`` float32; the scales are the active ones
    of the step (1.0 outside ``cfg_interval``); returns the guided velocity ``[B, N, C]``.
    """

    needs: Callable[["ImageParams"], tuple]
    combine: Callable[..., jax.Array]


def _text_img_needs(p: "ImageParams") -> tuple:
    if p.cfg_text_scale <= 1.0:          # image CFG only acts with text CFG (official)
        return ()
    return ("cfg_text",) if p.cfg_img_scale <= 1.0 else ("cfg_text", "cfg_img")


def _text_img_combine(v: Mapping[str, jax.Array], st, si, renorm_type: str, renorm_min) -> jax.Array:
    return combine_cfg(v["gen"], v["cfg_text"], v.get("cfg_img"), st, si, renorm_type, renorm_min)


# "text_img": the official guidance (text CFG, then image CFG on top of it; docs/architecture.md#flow-sampling).
CFG_MODES: dict[str, CfgMode] = {"text_img": CfgMode(_text_img_needs, _text_img_combine)}


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """Image sampling hyperparameters: the one place their defaults live. Defaults: the official
    notebook's text-to-image settings (docs/architecture.md#default-hyperparameters); :meth:`edit` gives its editing
    settings."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple = (0.4, 1.0)
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"
    cfg_mode: str = "text_img"
    step_cache: str = "none"      # "taylorseer": TaylorSeer step caching (docs/architecture.md#taylorseer)

    @staticmethod
    def t2i(**kw) -> "ImageParams":
        return ImageParams(**kw)

    @staticmethod
    def edit(**kw) -> "ImageParams":
        d = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
        d.update(kw)
        return ImageParams(**d)

    @staticmethod
    def fill(edit: bool, **kw) -> "ImageParams":
        """The t2i or edit defaults with every non-None ``kw`` over them (API arguments default to None)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if "cfg_interval" in kw:
            kw["cfg_interval"] = tuple(float(x) for x in kw["cfg_interval"])
        return (ImageParams.edit(**kw) if edit else ImageParams.t2i(**kw)).validate()

    def validate(self) -> "ImageParams":
        """Check every field (type, finiteness, range) and return self; :class:`ValueError` names the field."""
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode must be one of {sorted(CFG_MODES)}, got {self.cfg_mode!r}")
        if self.step_cache not in STEP_CACHES:
            raise ValueError(f"step_cache must be one of {STEP_CACHES}, got {self.step_cache!r}")
        n = self.num_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2 (N gives N-1 model evaluations), got {n!r}")
        check_number("cfg_text_scale", self.cfg_text_scale, 0.0)
        check_number("cfg_img_scale", self.cfg_img_scale, 0.0)
        check_number("timestep_shift", self.timestep_shift, 0.0, open_lo=True)
        check_number("cfg_renorm_min", self.cfg_renorm_min, 0.0, 1.0)
        iv = self.cfg_interval
        if not isinstance(iv, (tuple, list)) or len(iv) != 2:
            raise ValueError(f"cfg_interval must be a pair (lo, hi), got {iv!r}")
        lo, hi = (check_number(f"cfg_interval {k}", v, 0.0, 1.0) for k, v in zip(("lo", "hi"), iv))
        if not lo <= hi:
            raise ValueError(f"cfg_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {tuple(iv)}")
        return self


def check_number(name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
                 open_lo: bool = False) -> float:
    """``value`` as a float if it is a finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``);
    else :class:`ValueError` naming ``name`` (inf and nan are refused: they give black images or turn CFG off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f"{'>' if open_lo else '>='} {lo}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


IMAGE_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(ImageParams))


class Guidance(NamedTuple):
    """The guidance settings of a sampling call as traced values (a pytree: they are arguments, not static, of
    the compiled samplers, so one program serves every scale). Scalars float32; ``interval`` ``[2]`` (lo, hi)."""

    text_scale: jax.Array
    img_scale: jax.Array
    interval: jax.Array
    renorm_min: jax.Array

    @staticmethod
    def of(params: ImageParams) -> "Guidance":
        return Guidance(jnp.float32(params.cfg_text_scale), jnp.float32(params.cfg_img_scale),
                        jnp.asarray(params.cfg_interval, jnp.float32), jnp.float32(params.cfg_renorm_min))


@dataclasses.dataclass(frozen=True)
class CfgPlan:
    """What one sampling call runs (hashable: a static argument of the compiled sampler).

    ``names``: ``"gen"`` then the guidance branches the mode reads; ``rows[i]``: the block of the stacked
    batch (``[rows | rows | ...]``, one block of ``B`` rows per distinct branch) that gives ``names[i]``
    (branches that are the same object are computed once); ``combine``: the mode's combination.
    """

    names: tuple
    rows: tuple
    combine: Callable[..., jax.Array]
    renorm_type: str

    @property
    def n_rows(self) -> int:
        return max(self.rows) + 1

    @property
    def guided(self) -> bool:
        return len(self.names) > 1

    def active(self, sigma, g: Guidance) -> jax.Array:
        """Whether guidance acts at the step of (shifted) ``sigma``: inside ``g.interval`` and the plan is guided."""
        return cfg_active(sigma, (g.interval[0], g.interval[1])) if self.guided else jnp.bool_(False)

    def guide(self, vs: jax.Array, sigma, g: Guidance) -> jax.Array:
        """The step's velocity from every row block's: ``vs [n_rows, B, N, C]`` -> ``[B, N, C]`` (the mode's
        combination with the active scales; outside the interval, or unguided, the ``gen`` rows')."""
        if not self.guided:
            return vs[self.rows[0]]
        active = self.active(sigma, g)
        st, si = jnp.where(active, g.text_scale, 1.0), jnp.where(active, g.img_scale, 1.0)
        v = {name: vs[r] for name, r in zip(self.names, self.rows)}
        return self.combine(v, st, si, self.renorm_type, g.renorm_min)

    def step(self, velocity: Callable[[int], jax.Array], sigma, g: Guidance, cfg_off: str = "cond") -> jax.Array:
        """The guidance step of every sampler: ``velocity(rows)`` gives the velocities ``[rows, B, N, C]`` of the
        first ``rows`` row blocks (the model runs on those rows only); returns the step's velocity ``[B, N, C]``.
        Outside the interval only the ``gen`` rows run: with ``cfg_off="cond"`` a ``lax.cond`` picks the call,
        with ``"where"`` every row block runs and ``jnp.where`` picks the result."""
        if not self.guided:
            return velocity(1)[0]
        active = self.active(sigma, g)
        if cfg_off == "cond":
            return jax.lax.cond(active, lambda: self.guide(velocity(self.n_rows), sigma, g), lambda: velocity(1)[0])
        vs = velocity(self.n_rows)
        return jnp.where(active, self.guide(vs, sigma, g), vs[self.rows[0]])


def make_plan(params: ImageParams, branches: Mapping[str, object], dedup: bool = True) -> tuple[CfgPlan, list]:
    """The plan for ``params`` over a context's ``branches`` (``"gen"`` and the guidance branches by name)
    and the distinct branches to stack, in row-block order. A context that keeps no guidance branches
    (understanding contexts) samples unguided. ``dedup=False`` gives every named branch its own row
    block even when two are the same object (TaylorSeer: branches that run on different steps keep
    different states)."""
    mode = CFG_MODES[params.validate().cfg_mode]
    needs = tuple(mode.needs(params)) if len(branches) > 1 else ()
    missing = [n for n in needs if branches.get(n) is None]
    if missing:
        raise ValueError(f"cfg_mode {params.cfg_mode!r} needs the branches {missing}, which the context lacks "
                         f"(it has {sorted(n for n, b in branches.items() if b is not None)})")
    distinct, rows = [], []
    for name in ("gen",) + needs:
        b = branches[name]
        i = next((k for k, d in enumerate(distinct) if d is b and dedup), len(distinct))
        if i == len(distinct):
            distinct.append(b)
        rows.append(i)
    return CfgPlan(("gen",) + needs, tuple(rows), mode.combine, params.cfg_renorm_type), distinct


def shifted_schedule(num_timesteps: int, shift: float) -> jax.Array:
    """``sigma_k = s*t_k / (1 + (s-1)*t_k)``, ``t_k = linspace(1, 0, N)``; N-1 Euler steps use ``sigma[:-1]``."""
    t = jnp.linspace(1.0, 0.0, num_timesteps, dtype=jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def cfg_active(sigma, interval) -> jax.Array:
    """Official interval test on the shifted sigma: ``lo < sigma <= hi``."""
    lo, hi = interval
    return (sigma > lo) & (sigma <= hi)
