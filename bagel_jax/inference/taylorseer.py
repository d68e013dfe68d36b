"""TaylorSeer step caching for the flow sampler (docs/architecture.md#taylorseer), as data inside the ``lax.scan``.

Each CFG branch of a sampling call has its own state: a branch step counter that advances only when
the branch runs, a skip counter, the last full ("activated") step and the cached Taylor factors of the
decoder's output. A branch step is **full** if ``step < first_enhance`` or ``skip == fresh_threshold - 1``;
otherwise it is a **Taylor** step. A full step runs the decoder and refreshes the factors from its output
``f``: ``d0 = f`` and, from ``step >= first_enhance - 1`` on, ``d_{i+1} = (d_i - old_i) / (step - last)``
for every order the old cache has (up to ``max_order``). A Taylor step runs no decoder layer: the output
is ``sum_i d_i x^i / i!`` with ``x = step - last``; the final norms and ``llm2vae`` follow as usual.

Only the last layer's output reaches the velocity (the final norms read it; a Taylor step computes no
layer), so by default only its factors are kept: the same velocities as the reference, which caches
every layer, at ``1 / layers`` of the memory. ``all_layers=True`` keeps (and predicts) every layer, for
checking against the reference's per-layer outputs.

Unlike the reference, the state is scoped to one sampling call's flow steps (the reference leaves its
model-level flag on after a call, so later prefills are predicted too).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TaylorSeer:
    """The rule's parameters (defaults: the values the official cache initialisation hard-codes).
    Hashable: a static argument of the compiled sampler."""

    fresh_threshold: int = 3
    first_enhance: int = 5
    max_order: int = 6
    all_layers: bool = False

    def __post_init__(self):
        if self.fresh_threshold < 1 or self.first_enhance < 1 or self.max_order < 0:
            raise ValueError(f"TaylorSeer needs fresh_threshold >= 1, first_enhance >= 1, max_order >= 0; got {self}")

    @property
    def n_factors(self) -> int:
        return self.max_order + 1


@flax.struct.dataclass
class State:
    """Per-branch state, leading axis ``n`` = the plan's distinct branches (row blocks)."""

    step: jax.Array       # [n] int32: branch steps done (the current step's index while it runs)
    skip: jax.Array       # [n] int32: Taylor steps since the last full step
    last: jax.Array       # [n] int32: the last full branch step
    n_valid: jax.Array    # [n] int32: factors held (0 before the first full step)
    factors: jax.Array    # [n, n_factors, *feature]: d_0 .. d_max_order (zeros beyond n_valid)


def init(ts: TaylorSeer, n: int, feature_shape: tuple, dtype) -> State:
    z = jnp.zeros((n,), jnp.int32)
    return State(z, z, z, z, jnp.zeros((n, ts.n_factors) + tuple(feature_shape), dtype))


def is_full(ts: TaylorSeer, s: State) -> jax.Array:
    """``[n]`` bool: whether each branch's next step, if it runs, is a full step."""
    return (s.step < ts.first_enhance) | (s.skip == ts.fresh_threshold - 1)


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def predict(ts: TaylorSeer, s: State) -> jax.Array:
    """The Taylor sum of every branch at its current step: ``[n, *feature]``."""
    x = (s.step - s.last).astype(s.factors.dtype)                         # [n]
    out = jnp.zeros_like(s.factors[:, 0])
    for i in range(ts.n_factors):   # (1 / i!) * d_i * x^i, the reference's order of operations
        term = (1.0 / math.factorial(i)) * s.factors[:, i] * _bcast(x ** i, out)
        out = out + jnp.where(_bcast(i < s.n_valid, out), term, 0)
    return out


def refresh(ts: TaylorSeer, s: State, f: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Factors after a full step with output ``f [n, *feature]``: ``(factors, n_valid)``."""
    old = s.factors
    delta = _bcast((s.step - s.last).astype(old.dtype), f)     # distance to the previous full step
    grow = s.step >= ts.first_enhance - 1
    new = [f.astype(old.dtype)]
    for i in range(ts.max_order):
        ok = _bcast(grow & (i < s.n_valid), f)
        new.append(jnp.where(ok, (new[i] - old[:, i]) / jnp.where(ok, delta, 1), 0))
    n_valid = jnp.where(grow, 1 + jnp.minimum(s.n_valid, ts.max_order), 1)
    return jnp.stack(new, axis=1), n_valid.astype(jnp.int32)


def advance(ts: TaylorSeer, s: State, runs: jax.Array, full: jax.Array, f: jax.Array) -> State:
    """The state after one sampler step: ``runs`` / ``full`` ``[n]`` bool (which branches ran, and which of
    those fully), ``f`` the branches' outputs (used where full)."""
    factors, n_valid = refresh(ts, s, f)
    fr = runs & full
    return State(step=s.step + runs.astype(jnp.int32),
                 skip=jnp.where(fr, 0, s.skip + (runs & ~full).astype(jnp.int32)),
                 last=jnp.where(fr, s.step, s.last),
                 n_valid=jnp.where(fr, n_valid, s.n_valid),
                 factors=jnp.where(_bcast(fr, factors), factors, s.factors))
