"""Stateful conversations and interleaved text-and-image generation on a :class:`~bagel_jax.inference.api.Pipeline`
(re-exported by :mod:`bagel_jax.inference.api` and ``bagel_jax``).

Random streams: the initial image noise of row ``i`` of a call with seed ``s`` is drawn from
``PRNGKey(s + i)`` (:func:`noise_keys`); text sampling (answers, thinking) uses
``fold_in(PRNGKey(s + i), TEXT_STREAM)`` (:func:`text_keys`), so the two never share a key.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import jax
from PIL import Image

from . import streaming
from .cfg import IMAGE_PARAM_NAMES, ImageParams, check_number
from .context import Context, seed_key, GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT
from .decode import decode_text
from .text_sampling import SamplingParams

DEFAULT_MAX_TEXT = 1000
TEXT_STREAM = 1   # fold_in tag of the text-sampling stream (the noise stream is the row key itself)


def noise_keys(seed: int, n: int) -> list:
    """Initial-noise keys of rows ``0..n-1``: ``PRNGKey(seed + i)`` (batched equals one at a time)."""
    return [seed_key(seed + i) for i in range(n)]


def text_keys(seed: int, n: int) -> list:
    """Text-sampling keys of rows ``0..n-1``: ``fold_in(PRNGKey(seed + i), TEXT_STREAM)``."""
    return [jax.random.fold_in(k, TEXT_STREAM) for k in noise_keys(seed, n)]


def as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def sampling(do_sample, temperature, top_k, top_p) -> SamplingParams:
    """Checked text sampling settings (finite numbers, ``top_k`` an integer) -> :class:`SamplingParams`."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    return SamplingParams(bool(do_sample), check_number("temperature", temperature), int(top_k),
                          check_number("top_p", top_p)).validate()


@dataclasses.dataclass
class InterleaveResult:
    """Ordered output of :meth:`Pipeline.interleave`: ``items`` are ``("text", str)``, ``("think", str)``
    (thinking text, think mode, just before its image) and ``("image", PIL)``. ``error`` is set (and
    ``items`` holds everything produced before it) when generation failed midway."""

    items: list
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def texts(self) -> list:
        return [v for k, v in self.items if k == "text"]

    @property
    def thinking(self) -> list:
        return [v for k, v in self.items if k == "think"]

    @property
    def images(self) -> list:
        return [v for k, v in self.items if k == "image"]


class Conversation:
    """A stateful wrapper over an immutable :class:`Context` (batch 1): each call adds to the context and
    only the new tokens are computed. ``history`` lists ``(role, "text"|"think"|"image", value)`` in order;
    ``last_thinking`` is the thinking text of the latest image (None without think)."""

    def __init__(self, pipe, think: Optional[str] = None, seed: int = 0, defaults: Optional[dict] = None):
        self.pipe = pipe
        self.ctx = Context.new(pipe.engine, 1, seed=seed)   # checks the seed
        self.seed = int(seed)
        self.defaults = dict(defaults or {})
        self._calls = 0
        self.has_input_image = False
        self.last_thinking: Optional[str] = None
        self.history: list = []
        if think not in (None, "gen", "vlm"):
            raise ValueError(f"think must be None, 'gen' or 'vlm', got {think!r}")
        if think:
            sysp = GEN_THINK_SYSTEM_PROMPT if think == "gen" else VLM_THINK_SYSTEM_PROMPT
            self.ctx = self.ctx.add_text(sysp, role="system")
            self.history.append(("system", "text", sysp))

    def _seed(self) -> int:
        self._calls += 1
        return self.seed + 1000 * self._calls

    def _d(self, name, value, default):
        return value if value is not None else self.defaults.get(name, default)

    def _sampling(self, do_sample=None, temperature=None, top_k=None, top_p=None) -> SamplingParams:
        return sampling(self._d("do_sample", do_sample, False), self._d("temperature", temperature, 0.3),
                        self._d("top_k", top_k, 0), self._d("top_p", top_p, 1.0))

    def _speculation(self, draft=None, speculate=None) -> dict:
        """Speculative decoding settings of a call over the conversation's defaults (``draft`` None: plain)."""
        return dict(draft=self._d("draft", draft, None), speculate=self._d("speculate", speculate, 4))

    def say(self, text: str) -> "Conversation":
        """Add a user text segment (no generation)."""
        self.ctx = self.ctx.add_text(text, role="user")
        self.history.append(("user", "text", text))
        return self

    def add_image(self, image) -> "Conversation":
        """Add a user image (VAE + ViT blocks, so it can be both understood and edited)."""
        self.ctx = self.ctx.add_image(image, role="user")
        self.has_input_image = True
        self.history.append(("user", "image", self.ctx.history[-1][2][0]))
        return self

    def reply(self, max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
              temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
              stop_tokens=None, return_stop: bool = False, progress: bool = False, draft=None, speculate=None):
        """Generate the model's text reply from the current context and add it to the context. ``draft`` /
        ``speculate`` (default: the conversation's): speculative decoding, as :meth:`Pipeline.understand`."""
        n = int(self._d("max_new_tokens", max_new_tokens, DEFAULT_MAX_TEXT))
        sp = self._sampling(do_sample, temperature, top_k, top_p)
        r = decode_text(self.ctx, n, sp, text_keys(self._seed(), 1), stop_tokens, progress,
                        **self._speculation(draft, speculate))
        text = r.texts[0]
        if text:
            self.ctx = self.ctx.add_text(text, role="assistant")
            self.history.append(("assistant", "text", text))
        return (text, r.stop[0]) if return_stop else text

    def next_is_image(self) -> bool:
        """Model mode's decision after a text: whether the model, at the ``<|im_end|>`` that closes the
        context's last text, emits ``<|vision_start|>`` next (greedy). That position is where training
        with the official ``special_token_loss`` puts the label (docs/architecture.md#training-packing):
        ``<|vision_start|>`` when a generated image follows, ``<|im_end|>`` when the turn ends. False when the
        context does not end with a text."""
        ctx = self.ctx
        if not ctx.history or ctx.history[-1][0] != "text" or ctx.last_hidden is None:
            return False
        end = len(ctx.text_ids(list(ctx.history[-1][2]))[0]) - 1   # the closing <|im_end|>
        eng = self.pipe.engine
        logits = eng.model.apply({"params": eng.params}, ctx.last_hidden[:, end], method=type(eng.model).lm_logits)
        return int(jax.numpy.argmax(logits[0])) == eng.sp.start_of_image

    def ask(self, question: str, **kw) -> str:
        """Add a question and return the reply."""
        self.say(question)
        return self.reply(**kw)

    def generate_image(self, prompt: Optional[str] = None, think: bool = False, image_size=None,
                       max_think_tokens: Optional[int] = None, progress: bool = False,
                       image_mode: Optional[str] = None, patch_group: Optional[int] = None, **kw) -> Image.Image:
        """Add ``prompt`` (if given) and generate an image from the whole conversation; the image is then
        added to the context (VAE + ViT) so later turns can refer to / edit it. ``kw``: fields of
        :class:`~bagel_jax.inference.cfg.ImageParams`, over the conversation's defaults, over the editing
        defaults when the conversation holds an input image and the text-to-image ones otherwise. With
        ``think`` the model first writes its thinking text (at most ``max_think_tokens`` fed tokens),
        which conditions the image and is kept in ``last_thinking`` and ``history``. ``image_mode`` /
        ``patch_group`` (default: the conversation's): as :meth:`Pipeline.generate_image`; a patch-AR image
        joins the context like a whole one (VAE + ViT blocks), so text decoding continues after it."""
        unknown = set(kw) - set(IMAGE_PARAM_NAMES)
        if unknown:
            raise TypeError(f"generate_image: unknown arguments {sorted(unknown)}")
        if prompt is not None:
            self.say(prompt)
        edit = self.has_input_image
        ip = ImageParams.fill(edit, **{k: kw.get(k, self.defaults.get(k)) for k in IMAGE_PARAM_NAMES})
        if image_size is None:
            image_size = self.defaults.get("image_size")
        if image_size is None:
            image_size = self.ctx.image_hw[0] if (edit and self.ctx.image_hw) else self.pipe.default_image_size
        hw = self.pipe.engine.check_output_size(image_size)
        image_mode = self._d("image_mode", image_mode, None)
        self.pipe._check_image_mode(image_mode)
        seed = self._seed()
        ctx = self.ctx
        self.last_thinking = None
        if think:
            n = int(self._d("max_think_tokens", max_think_tokens, DEFAULT_MAX_TEXT))
            ctx, texts = self.pipe._think(ctx, n, self._sampling(), seed, progress, **self._speculation())
            self.last_thinking = texts[0]
            self.history.append(("assistant", "think", texts[0]))
        img = self.pipe._sample(ctx, hw, ip, seed, progress, image_mode=image_mode,
                                patch_group=self._d("patch_group", patch_group, None)).image
        self.ctx = ctx.add_image(img, role="assistant")
        self.history.append(("assistant", "image", img))
        return img

    @property
    def has_image(self) -> bool:
        """Whether the conversation holds an image (added or generated) that :meth:`edit` can edit."""
        return any(kind == "image" for _, kind, _ in self.history)

    def edit(self, instruction: str, **kw) -> Image.Image:
        """Edit the latest image with ``instruction`` (editing defaults). :class:`ValueError` when the
        conversation holds no image yet (nothing is generated then)."""
        if not self.has_image:
            raise ValueError("edit: the conversation has no image to edit; add one (add_image, chat /image PATH) "
                             "or generate one first")
        self.has_input_image = True
        return self.generate_image(instruction, **kw)

    def stream(self, method: str, *args, chunk: int = streaming.DEFAULT_CHUNK, **kw) -> streaming.Stream:
        """Run one turn streamed (:mod:`~bagel_jax.inference.streaming`): ``method`` is "ask", "reply",
        "generate_image" or "edit"; events: "text" / "think" pieces, the "image", then "done" with the
        method's return value. Do not use the conversation until the stream has ended."""
        if method not in ("ask", "reply", "generate_image", "edit"):
            raise ValueError(f"stream: method must be 'ask', 'reply', 'generate_image' or 'edit', got {method!r}")
        return streaming.stream(getattr(self, method), *args, chunk=chunk, **kw)


MARKER = "<|vision_start|>"


def check_interleave(inputs, mode: str, num_images) -> list:
    """Refuse an interleave request that cannot work, before any compute (:class:`ValueError`); returns the
    inputs as a list. ``num_images`` (auto mode) is an integer >= 0; 0 means no image (one closing text)."""
    if mode not in ("model", "explicit", "auto"):
        raise ValueError(f"interleave: mode must be 'model', 'explicit' or 'auto', got {mode!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral) or num_images < 0:
        raise ValueError(f"interleave: num_images must be an integer >= 0, got {num_images!r}")
    parts = [inputs] if isinstance(inputs, str) else as_list(inputs)
    if mode == "explicit" and not any(isinstance(p, str) and MARKER in p for p in parts):
        raise ValueError(f"interleave: mode 'explicit' puts one image at each {MARKER} marker, and no prompt "
                         "has one (use mode 'auto' with num_images, or 'model')")
    return parts


def interleave(pipe, inputs, mode: str = "model", num_images: int = 1, image_size=None,
               max_text_length: int = 500, max_interleaved_blocks: int = 8, think: bool = False,
               max_think_tokens: Optional[int] = None, seed: int = 0, progress: bool = False,
               on_item=None, **kw) -> InterleaveResult:
    """:meth:`Pipeline.interleave` (documented there)."""
    parts = check_interleave(inputs, mode, num_images)
    defaults = dict(kw, image_size=image_size or pipe.default_image_size)
    if max_think_tokens is not None:
        defaults["max_think_tokens"] = int(max_think_tokens)
    conv = Conversation(pipe, "gen" if think else None, seed, defaults)
    items = []

    def emit(kind, value):   # each item is handed to on_item as soon as it exists
        items.append((kind, value))
        if on_item is not None:
            on_item((kind, value))

    def image():   # an image block, after its thinking text in think mode
        img = conv.generate_image(None, think=think, progress=progress)
        if conv.last_thinking is not None:
            emit("think", conv.last_thinking)
        emit("image", img)

    try:
        for p in parts:
            if isinstance(p, str):
                if mode == "explicit" and MARKER in p:
                    continue
                conv.say(p)
            else:
                conv.add_image(p)
        if mode == "explicit":
            for p in parts:
                if not (isinstance(p, str) and MARKER in p):
                    continue
                segs = p.split(MARKER)
                for j, seg in enumerate(segs):
                    if seg.strip():
                        conv.say(seg)
                        emit("text", seg)
                    if j < len(segs) - 1:
                        image()
        elif mode == "auto":
            for _ in range(num_images):
                text = conv.reply(max_new_tokens=max_text_length, progress=progress)
                if text:
                    emit("text", text)
                image()
            text = conv.reply(max_new_tokens=max_text_length, progress=progress)
            if text:
                emit("text", text)
        else:
            sp = pipe.engine.sp
            n_blocks = 0
            for _ in range(max_interleaved_blocks):
                text, stop = conv.reply(max_new_tokens=max_text_length, progress=progress,
                                        stop_tokens=[sp.eos, sp.start_of_image], return_stop=True)
                if text:
                    emit("text", text)
                    n_blocks += 1
                # an image starts when the model emits <|vision_start|>: in the text, or after its <|im_end|>
                draws = stop == sp.start_of_image or (stop == sp.eos and bool(text) and conv.next_is_image())
                if not draws or n_blocks >= max_interleaved_blocks:
                    break
                image()
                n_blocks += 1
                if n_blocks >= max_interleaved_blocks:
                    break
    except Exception as e:  # nothing lost: return what was produced
        return InterleaveResult(items, e)
    return InterleaveResult(items, None)
