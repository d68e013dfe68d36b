"""The state of a :class:`~bagel_jax.data.loader.PackedIterator` across processes: ``{"rows": [...]}``, one
entry per row stream of a step (``None`` for rows another process builds; module doc of
:mod:`bagel_jax.data.loader`)."""

from __future__ import annotations

import copy

from .errors import DataConfigError


def merge_states(states: list) -> dict:
    """One iterator state from the states of processes that build different rows (:meth:`PackedIterator.get_state`):
    each row's state from the first process that has it."""
    rows = [next((s["rows"][r] for s in states if s["rows"][r] is not None), None)
            for r in range(len(states[0]["rows"]))]
    return {"rows": rows}


def state_totals(state: dict) -> dict:
    """The counters of all row streams in ``state`` (rows of other processes, ``None``, count as 0): a dict
    with ``packs``, ``skipped`` (per group), ``too_long`` and ``dropped``, as one row's state has them."""
    rows = [r for r in state["rows"] if r is not None]
    skipped = {}
    for r in rows:
        for g, v in r["skipped"].items():
            skipped[g] = skipped.get(g, 0) + v
    return dict(packs=sum(r["packs"] for r in rows), skipped=skipped,
                too_long=sum(r["too_long"] for r in rows), dropped=sum(r["dropped"] for r in rows))


def describe_state(state: dict) -> str:
    """One line of counters of :func:`state_totals` (or of one row's state)."""
    return (f"packs={state['packs']} skipped={sum(state['skipped'].values())} "
            f"too_long={state['too_long']} dropped={state['dropped']}")


def select_rows(state: dict, num_rows: int, rows: list, names: list) -> dict:
    """``{row: state}`` of the ``rows`` an iterator builds, from a (merged) iterator state; raises
    :class:`DataConfigError` if the state has another number of rows or other groups."""
    if "rows" not in state and num_rows == 1:   # a checkpoint from before row streams: one stream
        state = {"rows": [state]}
    have = state.get("rows")
    if not isinstance(have, list) or len(have) != num_rows:
        raise DataConfigError(f"data-iterator state has {len(have) if isinstance(have, list) else 'no'} row "
                              f"streams, data.packs_per_step is {num_rows} (keep packs_per_step when resuming)")
    for r in rows:
        if not isinstance(have[r], dict) or set(have[r].get("next", {})) != set(names):
            got = sorted(have[r].get("next", {})) if isinstance(have[r], dict) else have[r]
            raise DataConfigError(f"data-iterator state of row {r} is for groups {got}, "
                                  f"the data folder has {sorted(names)}")
    return {r: copy.deepcopy(have[r]) for r in rows}
