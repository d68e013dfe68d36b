"""A background thread that runs a :class:`~bagel_jax.data.loader.PackedIterator` ahead of the train loop."""

from __future__ import annotations

import queue
import threading


class Prefetcher:
    """Runs ``it.next_batch`` (or ``produce``) of a :class:`~bagel_jax.data.loader.PackedIterator` in a
    background thread; each item carries the iterator state *after* it, so checkpointing the state of the last consumed batch resumes
    exactly."""

    def __init__(self, it, depth: int = 2, produce=None):
        self.it = it
        self.produce = produce or it.next_batch   # e.g. ``it.next_packs`` (collated later, multi-host)
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                b = self.produce()
                item = (b, self.it.get_state())
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # surfaced in the consumer
            self.q.put(e)

    def next(self, interrupted=None):
        """The next ``(batch, state)``; re-raises an error of the loader thread. ``interrupted``: a
        callable polled while waiting; when it returns true, :class:`Interrupted` is raised (a stuck
        data source must not make a signal handler wait forever)."""
        while True:
            try:
                item = self.q.get(timeout=0.1)
                break
            except queue.Empty:
                if interrupted is not None and interrupted():
                    raise Interrupted("interrupted while waiting for the data pipeline") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 5.0):
        self._stop.set()
        self.t.join(timeout=timeout)


class Interrupted(Exception):
    """Raised by :meth:`Prefetcher.next` when its ``interrupted`` callable fires while it waits."""
