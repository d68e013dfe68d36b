"""Host-side progress bars fed by ``jax.debug.callback`` from inside compiled loops.

The compiled loops stay whole: when progress is on, each step calls :func:`tick` on the host
(unordered callback, no data dependency on the loop). :func:`bar` opens a tqdm bar for a named kind
("steps", "tokens") for the duration of a ``with`` block; without an open bar ticks are ignored.
"""

from __future__ import annotations

import contextlib
import threading

_bars: dict = {}
_lock = threading.Lock()


@contextlib.contextmanager
def bar(kind: str, total: int, desc: str, enabled: bool = True):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    b = tqdm(total=total, desc=desc, unit=kind, leave=False, dynamic_ncols=True)
    with _lock:
        _bars[kind] = b
    try:
        yield b
    finally:
        with _lock:
            _bars.pop(kind, None)
        b.close()


def tick(kind: str, step: int, total: int, postfix: str = "") -> None:
    """Advance the open bar of ``kind`` to ``step`` of ``total``; ``postfix`` (e.g. speculative decoding's
    acceptance rate) is shown after the counts."""
    with _lock:
        b = _bars.get(kind)
        if b is None:
            return
        if b.total != total:
            b.total = total
        if postfix:
            b.set_postfix_str(postfix, refresh=False)
        if step > b.n:
            b.update(step - b.n)
