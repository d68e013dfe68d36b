"""Streaming: text pieces as they are decoded and each image as soon as it is decoded, then the final result.

    for ev in pipe.stream_interleave("Tell a story", mode="auto", num_images=2):
        if ev.kind in ("text", "think"): print(ev.value, end="", flush=True)   # a piece of the current block
        elif ev.kind == "image": ev.value.save(...)                              # PIL, as soon as it is decoded
        else: result = ev.value                                                  # "done": the call's own result

:func:`stream` runs any inference call (a :class:`~bagel_jax.inference.api.Pipeline` or
:class:`~bagel_jax.inference.conversation.Conversation` method) in a worker thread with a :class:`Sink` set in
a context variable. Text decoding (:func:`~bagel_jax.inference.decode.generate_text`) then runs its compiled
loop in chunks of ``chunk`` tokens (one host round-trip per chunk, not per token) and hands each row's new
text to the sink; image sampling hands each decoded image to it. The call itself is unchanged, so a streamed
call returns exactly what the plain call returns (same tokens, same per-step keys, same images): the
``done`` event's value. No sink is set outside :func:`stream`, so plain calls behave as before.

Text pieces are ``"text"`` (answers, interleaved text) or ``"think"`` (thinking text before an image);
consecutive pieces of one kind and row form one text block. Closing the iterator early (``break``,
garbage collection, a cancelled web request) or :meth:`Stream.cancel` stops the call at the next chunk, flow
step or image boundary (:class:`Cancelled` inside the worker) and waits for the worker to end: an image being
sampled skips its remaining steps and its VAE decode (:func:`stop_requested`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Optional

import numpy as np

KINDS = ("text", "think", "image", "done")
DEFAULT_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One streamed item. ``kind``: "text" / "think" (``value`` a new piece of text of row ``row``), "image"
    (``value`` a PIL image of row ``row``) or "done" (``value`` the call's return value). ``t``:
    ``time.monotonic()`` when the worker produced it."""

    kind: str
    value: Any
    row: int = 0
    t: float = dataclasses.field(default_factory=time.monotonic)


class Cancelled(Exception):
    """Raised inside a streamed call once its consumer cancelled it (at the next chunk, flow step or image)."""


_tokens = itertools.count(1)
_live: "weakref.WeakValueDictionary[int, Sink]" = weakref.WeakValueDictionary()


class Sink:
    """Where a streamed call's pieces go: ``chunk`` tokens per decoding call, events to ``put``.
    ``token``: the sink's number, which compiled loops pass to :func:`stop_requested` to see a cancel
    between their steps."""

    def __init__(self, chunk: int, put: Callable[[StreamEvent], None]):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"stream chunk must be an integer >= 1, got {chunk!r}")
        self.chunk = chunk
        self._put = put
        self.cancelled = threading.Event()
        self.pieces_since_item: set = set()   # text kinds streamed since the last interleave item (row 0)
        self.token = next(_tokens)
        _live[self.token] = self

    def check(self) -> None:
        """Raise :class:`Cancelled` if the consumer cancelled the call."""
        if self.cancelled.is_set():
            raise Cancelled("stopped by the consumer")

    def emit(self, kind: str, value, row: int = 0) -> None:
        self.check()
        if kind in ("text", "think") and row == 0:
            self.pieces_since_item.add(kind)
        self._put(StreamEvent(kind, value, row))

    def text(self, row: int, piece: str) -> None:
        """A decoded text piece; its kind is the one :func:`text_kind` set ("text" by default)."""
        self.emit(_text_kind.get(), piece, row)

    def image(self, row: int, image) -> None:
        self.emit("image", image, row)


_sink: contextvars.ContextVar[Optional[Sink]] = contextvars.ContextVar("bagel_jax_stream_sink", default=None)
_text_kind: contextvars.ContextVar[str] = contextvars.ContextVar("bagel_jax_stream_text_kind", default="text")


def active() -> Optional[Sink]:
    """The sink of the streamed call running in this thread, or None."""
    return _sink.get()


def stop_requested(token) -> np.ndarray:
    """Whether the streamed call of sink number ``token`` was cancelled (a bool array; False for a sink that
    is gone). The image sampler's compiled loop asks this before every flow step of a streamed call
    (``jax.experimental.io_callback``) and skips the remaining steps once it is True."""
    sink = _live.get(int(token))
    return np.asarray(sink is not None and sink.cancelled.is_set())


@contextlib.contextmanager
def text_kind(kind: str):
    """Tag the text decoded inside the block as ``kind`` ("think" for thinking text)."""
    tok = _text_kind.set(kind)
    try:
        yield
    finally:
        _text_kind.reset(tok)


def emit_images(images) -> None:
    """Hand decoded images (one per row) to the active sink, if any."""
    sink = active()
    if sink is not None:
        for b, im in enumerate(images):
            sink.image(b, im)


class Stream:
    """Iterator of :class:`StreamEvent` over one call running in a worker thread (see :func:`stream`).
    ``result`` is the call's return value once the ``done`` event was seen."""

    _END = object()

    def __init__(self, fn: Callable, args, kwargs, chunk: int):
        self._q: queue.Queue = queue.Queue()
        self.sink = Sink(chunk, self._q.put)
        self.result = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, args=(fn, args, kwargs), daemon=True,
                                        name="bagel_jax-stream")
        self._thread.start()

    def _work(self, fn, args, kwargs) -> None:
        _sink.set(self.sink)   # the thread's own context: plain calls elsewhere see no sink
        try:
            self._q.put(StreamEvent("done", fn(*args, **kwargs)))
        except BaseException as e:   # handed to the consumer
            self._error = e
        finally:
            self._q.put(self._END)

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while True:
                ev = self._q.get()
                if ev is self._END:
                    break
                if ev.kind == "done":
                    self.result = ev.value
                yield ev
            if self._error is not None:
                raise self._error
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop the call at its next chunk, flow step or image boundary and wait for the worker to end."""
        self.sink.cancelled.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def stream(fn: Callable, *args, chunk: int = DEFAULT_CHUNK, **kwargs) -> Stream:
    """Run ``fn(*args, **kwargs)`` streamed: an iterator of :class:`StreamEvent` ending with ``done``
    (``value`` = the return value; an exception of the call is raised by the iterator instead).
    ``chunk``: tokens per compiled decoding call (one host round-trip each)."""
    return Stream(fn, args, kwargs, chunk)


def collect_items(events) -> list:
    """Streamed events -> ``[(kind, value), ...]`` blocks: consecutive text / think pieces of one kind (row
    0) joined, images as they are; the ``done`` event left out (the shape of ``InterleaveResult.items``)."""
    items: list = []
    for ev in events:
        if ev.kind in ("text", "think") and ev.row == 0:
            if items and items[-1][0] == ev.kind:
                items[-1] = (ev.kind, items[-1][1] + ev.value)
            else:
                items.append((ev.kind, ev.value))
        elif ev.kind == "image" and ev.row == 0:
            items.append(("image", ev.value))
    return items


def item_hook(on_item: Optional[Callable] = None) -> Callable:
    """An ``on_item`` for :func:`~bagel_jax.inference.conversation.interleave` under a sink: a text item
    that was not decoded piece by piece (an explicit-mode prompt segment) is streamed whole; then
    ``on_item`` (the caller's) is called."""
    def hook(item):   # runs in the streamed call's thread, where the sink is set
        kind, value = item
        sink = active()
        if sink is not None:
            if kind in ("text", "think") and kind not in sink.pieces_since_item:
                sink.emit(kind, value)
            sink.pieces_since_item.clear()
        if on_item is not None:
            on_item(item)
    return hook
