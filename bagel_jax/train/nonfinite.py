"""What the train loop does after a non-finite step (``train.on_nonfinite``: skip it, or stop after
checkpointing the last good state)."""

from __future__ import annotations

from .run_checkpoint import Checkpointer


class NonFiniteError(RuntimeError):
    """A step's loss, gradient norm or update was not finite (``train.on_nonfinite``)."""


def handle_nonfinite(tc, step: int, m: dict, count: int, state, dstates, ckpt: Checkpointer, saved: int,
                     say=print) -> int:
    """After a non-finite step (the step kept the previous weights): skip it, or stop with
    :class:`NonFiniteError` after checkpointing the last good state: in ``stop`` mode the state before
    this step (as step ``step - 1``), in ``skip`` mode the current one (skipped steps are part of the run).
    ``dstates``: the data-iterator states before and after this step; ``say`` prints a line. Returns the last
    saved step."""
    what = f"loss {m['loss']:.4g}, grad norm {m['grad_norm']:.4g}"
    skip = tc.on_nonfinite == "skip"
    if skip and count < tc.max_nonfinite_skips:
        say(f"[train] step {step}: non-finite ({what}); batch skipped, weights unchanged "
             f"({count} in a row, at most train.max_nonfinite_skips={tc.max_nonfinite_skips})")
        return saved
    good, good_state, good_data = (step, state, dstates[1]) if skip else \
        (step - 1, dict(state, step=state["step"] - 1), dstates[0])
    if good > saved and good_data is not None:
        ckpt.save(good, good_state, good_data)
        ckpt.wait()
        saved = good
    mode = (f"{count} in a row, train.max_nonfinite_skips={tc.max_nonfinite_skips}" if skip
            else "train.on_nonfinite=stop")
    raise NonFiniteError(f"step {step}: non-finite {what}; stopped ({mode}) without saving its update; the "
                         f"latest checkpoint is step {saved if saved >= 0 else 'none'}. Lower train.lr (or "
                         "train.max_grad_norm), check the data, or set train.on_nonfinite=skip")
