"""High-level inference API: ``bagel_jax.load(folder)`` and the :class:`Pipeline` it returns.

    import bagel_jax
    pipe = bagel_jax.load("/path/to/BAGEL-7B-MoT", dtype="bfloat16")
    pipe.understand(image, "What is in this image?")                 # -> str
    pipe.generate_image("A red cat on a blue mat").image             # ImageResult: .image PIL, .images
    pipe.edit_image(image, "Make the sky blue.").image
    conv = pipe.conversation(); conv.add_image(img); conv.ask("...") ; conv.generate_image("...")  # -> PIL
    pipe.interleave("Tell a story in pictures.", num_images=3)       # -> InterleaveResult

Image arguments default to None and are filled from :class:`~bagel_jax.inference.cfg.ImageParams`, the one
place of their defaults (the official notebook's, docs/architecture.md#default-hyperparameters): text-to-image
``ImageParams.t2i()``, 1024x1024; editing ``ImageParams.edit()``, output size = the VAE-resized input size.
Understanding and thinking are greedy with at most 1000 fed tokens (``temperature=0.3`` when ``do_sample``).

Seeds: row ``i`` of a batched call with ``seed=s`` draws its initial noise from ``PRNGKey(s + i)`` and samples
text from ``fold_in(PRNGKey(s + i), TEXT_STREAM)`` (:mod:`bagel_jax.inference.conversation`); the same
prompt alone with ``seed=s + i`` gives the same result (batched equals one at a time).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import numpy as np
from PIL import Image

from .. import layout
from .. import sharding as shd
from ..loading import INFERENCE_DEFAULTS_FILE, folder_defaults, load_model
from ..nn.options import ModelOptions, options_with
from ..lora import attach_folder
from ..runtime import use_compilation_cache
from . import progress as _progress
from . import streaming
from .cfg import ImageParams
from .context import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, Context
from .conversation import (DEFAULT_MAX_TEXT, Conversation, InterleaveResult, as_list, interleave, noise_keys,
                           sampling, text_keys)
from .decode import decode_text
from .engine import ContextError, Engine, InferenceOptions
from .patch_ar import generate_images_patch_ar
from .sampler import generate_images
from .speculative import ModelDraft
from .text_sampling import SamplingParams

__all__ = ["load", "folder_defaults", "INFERENCE_DEFAULTS_FILE", "Pipeline", "ImageResult", "Conversation",
           "InterleaveResult", "ImageParams", "ModelOptions", "InferenceOptions"]

DEFAULT_IMAGE_SIZE = (1024, 1024)

# what ``load`` runs with when it is given no ModelOptions (other fields: the ModelOptions defaults)
LOAD_DEFAULTS = dict(dtype="bfloat16", layer_loop="auto")


def load(folder: str, options: Optional[ModelOptions] = None, *, mesh=None,
         inference: Optional[InferenceOptions] = None, shardings=None, vae_shardings=None,
         compilation_cache: Optional[str] = None, lora: Optional[str] = None, **fields) -> "Pipeline":
    """Load an official BAGEL folder for inference: ``load(folder)``, ``load(folder, dtype="float32")``, or
    ``load(folder, options=ModelOptions(...))`` for the whole choice of how the model runs.

    Args:
      folder: official model folder (``llm_config.json``, ``vit_config.json``, ``ema.safetensors``,
        ``ae.safetensors``, tokenizer files).
      options: :class:`~bagel_jax.nn.options.ModelOptions` (checked where it is made). Default
        ``ModelOptions(dtype="bfloat16", layer_loop="auto")`` (:data:`LOAD_DEFAULTS`). The fields that matter
        here: ``dtype`` (compute dtype, "bfloat16" as released, or "float32"; the VAE runs in float32),
        ``param_dtype`` (storage dtype, default ``dtype``), ``attention_impl`` ("auto": "blocked" for cached
        inference and long sequences, "xla" for short ones; "xla", "blocked", "pallas" or "cudnn", see
        :mod:`bagel_jax.nn.attention`), ``quantize`` ("int8": int8 weight-only decoder layers, docs/int8.md;
        ``quantize_vit`` the ViT's too), ``layer_loop`` ("auto": "unrolled", per-layer weight arrays, on one
        CPU device, where the scan's per-layer weight copies cost up to half of a decode step; "scan"
        elsewhere; :mod:`bagel_jax.nn.layer_loop`). An unset ``auto_blocked_min_len`` takes the inference
        value (:meth:`~bagel_jax.nn.options.ModelOptions.for_inference`).
      fields: ModelOptions fields by keyword (``dtype="float32"``, ``quantize="int8"``), replacing those of
        ``options`` or of the default (:func:`~bagel_jax.nn.options.options_with`).
      mesh: run on several devices: a ``jax.sharding.Mesh`` with axes ``(data, fsdp, tensor)`` or a string
        ``"data=1,fsdp=2,tensor=2"`` (:func:`bagel_jax.sharding.parse_mesh`; the sizes multiply to the
        device count). Params are split by the rules of :mod:`bagel_jax.sharding` (``fsdp`` and ``tensor``
        split the weights, ``data`` replicates them), KV caches over rows and kv heads, activations by
        their logical axes; the VAE is replicated. Results equal one device (up to float reduction order).
      inference: :class:`~bagel_jax.inference.engine.InferenceOptions`: image transforms (default: the
        folder's ``inference.json`` if it has one, else the official inference transforms), the most tokens
        a conversation may hold (default: the model's max_position_embeddings), the KV cache dtype.
      shardings / vae_shardings: optional trees of ``jax.sharding.Sharding`` for the params (see
        :func:`bagel_jax.loading.load_model`); inputs then follow the params' placement, and the VAE
        follows the model when ``vae_shardings`` is not given.
      compilation_cache: a folder for JAX's persistent compilation cache, used unless JAX already has one
        (:func:`bagel_jax.runtime.use_compilation_cache`, a process-wide setting: ``sample.py`` and the app
        pass ``~/.cache/bagel_jax/jax``); default None leaves JAX's configuration as it is.
      lora: a LoRA adapter folder (a LoRA run's ``--export``), applied unmerged, also over int8 (docs/lora.md)."""
    opts = options_with(options, **fields) if options is not None else options_with(**{**LOAD_DEFAULTS, **fields})
    inference = inference or InferenceOptions()
    use_compilation_cache(compilation_cache)
    mesh = shd.make_mesh(**shd.parse_mesh(mesh)) if isinstance(mesh, str) else mesh
    bm = load_model(folder, opts.for_inference(), mesh=mesh, shardings=shardings, vae_shardings=vae_shardings)
    bm = attach_folder(bm, lora) if lora else bm
    fd = folder_defaults(folder)
    inference = dataclasses.replace(inference, vae_transform=inference.vae_transform or fd.get("vae_transform"),
                                    vit_transform=inference.vit_transform or fd.get("vit_transform"))
    pipe = Pipeline(Engine(bm, inference, mesh=mesh))
    pipe.default_image_size = fd.get("image_size", DEFAULT_IMAGE_SIZE)
    return pipe


@dataclasses.dataclass
class ImageResult:
    """Output of an image generation call: one image per prompt, plus the thinking text (think mode)."""

    images: list                      # PIL images
    thinking: Optional[list] = None   # per row thinking text (think=True) or None
    arrays: Optional[np.ndarray] = None  # [B, H, W, 3] uint8

    @property
    def image(self) -> Image.Image:
        return self.images[0]


class Pipeline:
    """Every way of using BAGEL on one loaded model. All calls are functional (contexts are immutable)."""

    def __init__(self, engine: Engine, default_image_size=DEFAULT_IMAGE_SIZE):
        self.engine = engine
        self.default_image_size = tuple(default_image_size)  # (H, W) when a call gives no image_size

    def _precheck(self, texts: Sequence[str], pre: Sequence[dict], extra: int, what: str) -> None:
        """Raise :class:`ContextError` before any compute if a request cannot fit in the context limit."""
        eng, cfg = self.engine, self.engine.cfg
        n = sum(layout.text_block(len(eng.tok.encode(t))).length for t in texts) + int(extra)
        for q in pre:
            n += sum(b.length for b in layout.image_blocks(cfg, q["hw"] if "vae" in q else None,
                                                           q["vit"].shape[1:] if "vit" in q else None))
        if n > eng.max_context:
            raise ContextError(f"context too long for {what}: {n} tokens needed (inputs + generation), limit "
                               f"{eng.max_context}")

    @property
    def tokenizer(self):
        return self.engine.tok

    def context(self, batch: int = 1, track_cfg: bool = True, seed: int = 0) -> Context:
        return Context.new(self.engine, batch, track_cfg, seed)

    # -- understanding ------------------------------------------------------------------------------
    def understand(self, images, question: Union[str, Sequence[str]], think: bool = False,
                   max_new_tokens: int = DEFAULT_MAX_TEXT, do_sample: bool = False, temperature: float = 0.3,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, progress: bool = False,
                   draft=None, speculate: int = 4):
        """Answer a question about zero or more images (official recipe: [SYS(VLM)], I_vit..., question).

        Args:
          images: None, one image (path / PIL / uint8 array) or a list of images, placed before the
            question. For a batch (``question`` a list) give one entry per question (each an image or a list).
          think: prepend the official VLM think system prompt (the answer then contains the reasoning).
          max_new_tokens: most fed tokens (official ``max_think_token_n``, default 1000; the start token counts).
          draft: speculative decoding (:mod:`bagel_jax.inference.speculative`): ``"ngram"`` (prompt lookup), a
            draft :class:`Pipeline` with the same tokenizer, or a loaded Hugging Face Qwen2 draft
            (:func:`bagel_jax.inference.draft_lm.load_qwen2_draft`); ``speculate``: tokens proposed per target
            pass, or ``"auto"`` (adapted between rounds from the acceptance rate).
        Returns the answer (``str``), or a list for a batch.
        """
        batched = isinstance(question, (list, tuple))
        questions = list(question) if batched else [question]
        if not questions:
            raise ValueError("understand: no question given")
        if batched:
            per_row = [as_list(x) for x in (images if images is not None else [None] * len(questions))]
            if len(per_row) != len(questions):
                raise ValueError(f"understand: {len(per_row)} image entries for {len(questions)} questions")
        else:
            per_row = [as_list(images)]
        n_img = {len(r) for r in per_row}
        if len(n_img) != 1:
            raise ValueError("understand: in a batch every question needs the same number of images")
        sp = sampling(do_sample, temperature, top_k, top_p)
        B = len(questions)
        # preprocess everything first: bad images fail before any compute
        pre = [[self.engine.preprocess(im, vae=False, vit=True) for im in r] for r in per_row]
        for b, q in enumerate(questions):
            self._precheck(([VLM_THINK_SYSTEM_PROMPT] if think else []) + [q], pre[b], max_new_tokens, "understand")
        n_img = n_img.pop()

        def build(engine, pre):
            ctx = Context.new(engine, B, track_cfg=False, seed=seed)
            if think:
                ctx = ctx.add_text(VLM_THINK_SYSTEM_PROMPT, role="system")
            for j in range(n_img):
                ctx = ctx.add_image(None, vae=False, vit=True, preprocessed=[pre[b][j] for b in range(B)])
            return ctx.add_text(questions)

        ctx = build(self.engine, pre)
        if draft is not None and not isinstance(draft, (str, Pipeline)) and not hasattr(draft, "propose"):
            raise ValueError(f"understand: draft must be 'ngram', a Pipeline or a loaded draft, got {draft!r}")
        if isinstance(draft, Pipeline):      # a small BAGEL sees the same (preprocessed by its engine) images
            dpre = [[draft.engine.preprocess(im, vae=False, vit=True) for im in r] for r in per_row]
            draft = ModelDraft(build(draft.engine, dpre))
        r = decode_text(ctx, max_new_tokens, sp, text_keys(seed, B), progress=progress, draft=draft,
                        speculate=speculate)
        return r.texts if batched else r.texts[0]

    # -- image generation ---------------------------------------------------------------------------------
    def _sample(self, ctx: Context, hw, ip: ImageParams, seed: int, progress: bool, noise=None,
                image_mode: Optional[str] = None, patch_group: Optional[int] = None) -> ImageResult:
        B = ctx.batch
        if image_mode not in (None, "whole"):
            return self._sample_patch_ar(ctx, hw, ip, seed, progress, noise, patch_group)
        with _progress.bar("steps", ip.num_timesteps - 1, "denoising", progress):
            out = generate_images(ctx, hw, ip, keys=noise_keys(seed, B), noise=noise, progress=progress)
            jax.effects_barrier()
        arr = out["image"]
        res = ImageResult([Image.fromarray(a) for a in arr], None, arr)
        streaming.emit_images(res.images)   # streamed calls: each image as soon as it is decoded
        return res

    def _sample_patch_ar(self, ctx: Context, hw, ip: ImageParams, seed: int, progress: bool, noise,
                         patch_group: Optional[int]) -> ImageResult:
        """``image_mode="patch_ar"`` (:mod:`bagel_jax.inference.patch_ar`); the progress bar counts latent patches."""
        n = layout.latent_tokens(*self.engine.check_output_size(hw), self.engine.cfg.latent_downsample)
        with _progress.bar("patches", n, "patches", progress):
            out = generate_images_patch_ar(ctx, hw, ip, patch_group, keys=noise_keys(seed, ctx.batch), noise=noise,
                                           progress=progress)
            jax.effects_barrier()
        arr = out["image"]
        res = ImageResult([Image.fromarray(a) for a in arr], None, arr)
        streaming.emit_images(res.images)
        return res

    def _check_image_mode(self, image_mode: Optional[str]) -> None:
        """A :class:`ValueError` for an unknown mode or ``"patch_ar"`` on a model not trained for it."""
        if image_mode not in (None, "whole", "patch_ar"):
            raise ValueError(f"image_mode must be 'whole' or 'patch_ar', got {image_mode!r}")
        if image_mode == "patch_ar" and self.engine.cfg.image_mode != "patch_ar":
            raise ValueError(f"image_mode 'patch_ar' needs a model trained in that mode; this one is "
                             f"{self.engine.cfg.image_mode!r} (a patch-AR demo: bagel_jax/assets/demo-patch-ar)")

    def _think(self, ctx: Context, max_think_tokens: int, sp: SamplingParams, seed: int, progress: bool,
               draft=None, speculate=4):
        """Thinking text from ``ctx`` (text stream of ``seed``; speculative with ``draft``, see
        :func:`~bagel_jax.inference.decode.decode_text`) -> (ctx with it added, texts)."""
        with streaming.text_kind("think"):
            r = decode_text(ctx, max_think_tokens, sp, text_keys(seed, ctx.batch), progress=progress, draft=draft,
                            speculate=speculate, desc="thinking")
        return ctx.add_generated_text(r.texts), r.texts

    def generate_image(self, prompt: Union[str, Sequence[str]], think: bool = False,
                       image_size: Optional[Sequence[int]] = None, cfg_text_scale: Optional[float] = None,
                       cfg_img_scale: Optional[float] = None, cfg_interval=None, timestep_shift: Optional[float] = None,
                       num_timesteps: Optional[int] = None, cfg_renorm_min: Optional[float] = None,
                       cfg_renorm_type: Optional[str] = None, cfg_mode: Optional[str] = None,
                       step_cache: Optional[str] = None, seed: int = 0, max_think_tokens: int = DEFAULT_MAX_TEXT,
                       do_sample: bool = False,
                       temperature: float = 0.3, top_k: int = 0, top_p: float = 1.0,
                       progress: bool = False, image_mode: Optional[str] = None,
                       patch_group: Optional[int] = None, draft=None, speculate=4) -> ImageResult:
        """Text-to-image (official recipe, docs/architecture.md#inference-contexts-and-cfg-branches). ``prompt`` may
        be a list: one compiled program generates all of them (same ``image_size``).

        Args:
          image_size: output (H, W), multiples of 16 (official default 1024x1024; app ratios 1024x1024,
            768x1024, 1024x768, 576x1024, 1024x576).
          think: official GEN think system prompt, then thinking text (greedy unless ``do_sample``; at most
            ``max_think_tokens`` fed tokens) re-encoded into the conditional context before the image.
          The CFG / schedule arguments are the fields of :class:`~bagel_jax.inference.cfg.ImageParams` (the
          docs/architecture.md#flow-sampling); None takes ``ImageParams.t2i()``'s value (the notebook's).
          step_cache: "taylorseer" predicts some flow steps from earlier ones instead of running the decoder
            (docs/architecture.md#taylorseer; about half the decoder passes, a close but not equal image); "none"
            (default).
          draft / speculate: speculative decoding of the thinking text (as :meth:`understand`).
          image_mode: "whole" (default, official: the image denoised as one block) or "patch_ar" (groups of
            ``patch_group`` latent tokens one after another, default the model's first ``patch_ar_groups``;
            only for a model trained in that mode, :mod:`bagel_jax.inference.patch_ar`).
        """
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("generate_image: prompt must be a string or a non-empty list of strings")
        ip = ImageParams.fill(False, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                              cfg_interval=cfg_interval, timestep_shift=timestep_shift, num_timesteps=num_timesteps,
                              cfg_renorm_min=cfg_renorm_min, cfg_renorm_type=cfg_renorm_type, cfg_mode=cfg_mode,
                              step_cache=step_cache)
        hw = self.engine.check_output_size(image_size or self.default_image_size)
        self._check_image_mode(image_mode)
        sp = sampling(do_sample, temperature, top_k, top_p)
        n_img = layout.vae_block(*hw, self.engine.cfg.latent_downsample, noised=True).length   # the generated image
        if image_mode == "patch_ar":
            n_img = 2 + layout.latent_tokens(*hw, self.engine.cfg.latent_downsample)
        for p in prompts:
            self._precheck(([GEN_THINK_SYSTEM_PROMPT] if think else []) + [p], [],
                           n_img + (max_think_tokens if think else 0), "generate_image")
        ctx = Context.new(self.engine, len(prompts), seed=seed)
        if think:
            ctx = ctx.add_text(GEN_THINK_SYSTEM_PROMPT, role="system")
        ctx = ctx.add_text(prompts)
        thinking = None
        if think:
            ctx, thinking = self._think(ctx, max_think_tokens, sp, seed, progress, draft, speculate)
        res = self._sample(ctx, hw, ip, seed, progress, image_mode=image_mode, patch_group=patch_group)
        res.thinking = thinking
        return res

    def edit_image(self, image, instruction: Union[str, Sequence[str]], think: bool = False,
                   cfg_text_scale: Optional[float] = None, cfg_img_scale: Optional[float] = None, cfg_interval=None,
                   timestep_shift: Optional[float] = None, num_timesteps: Optional[int] = None,
                   cfg_renorm_min: Optional[float] = None, cfg_renorm_type: Optional[str] = None,
                   cfg_mode: Optional[str] = None, step_cache: Optional[str] = None, seed: int = 0,
                   max_think_tokens: int = DEFAULT_MAX_TEXT, do_sample: bool = False, temperature: float = 0.3,
                   top_k: int = 0, top_p: float = 1.0, progress: bool = False, draft=None,
                   speculate=4) -> ImageResult:
        """Image editing (official recipe: [SYS], I_vae, I_vit, instruction [, THINK]); output size = the
        VAE-resized input size. ``image`` / ``instruction`` may be lists of equal length (batch; all
        images must resize to the same size). Image arguments: as :meth:`generate_image`, None takes
        ``ImageParams.edit()``'s value."""
        batched = isinstance(instruction, (list, tuple))
        instrs = list(instruction) if batched else [instruction]
        imgs = list(image) if batched and isinstance(image, (list, tuple)) else [image] * len(instrs)
        if len(imgs) != len(instrs):
            raise ValueError(f"edit_image: {len(imgs)} images for {len(instrs)} instructions")
        ip = ImageParams.fill(True, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                              cfg_interval=cfg_interval, timestep_shift=timestep_shift, num_timesteps=num_timesteps,
                              cfg_renorm_min=cfg_renorm_min, cfg_renorm_type=cfg_renorm_type, cfg_mode=cfg_mode,
                              step_cache=step_cache)
        sp = sampling(do_sample, temperature, top_k, top_p)
        pre = [self.engine.preprocess(im, vae=True, vit=True) for im in imgs]
        sizes = {p["hw"] for p in pre}
        if len(sizes) != 1:
            raise ValueError(f"edit_image: in a batch all images must resize to one size, got {sorted(sizes)}")
        hw = next(iter(sizes))
        n_img = layout.vae_block(*hw, self.engine.cfg.latent_downsample, noised=True).length   # the generated image
        for q, t in zip(pre, instrs):
            self._precheck(([GEN_THINK_SYSTEM_PROMPT] if think else []) + [t], [q],
                           n_img + (max_think_tokens if think else 0), "edit_image")
        ctx = Context.new(self.engine, len(instrs), seed=seed)
        if think:
            ctx = ctx.add_text(GEN_THINK_SYSTEM_PROMPT, role="system")
        ctx = ctx.add_image(None, preprocessed=pre)
        ctx = ctx.add_text(instrs)
        thinking = None
        if think:
            ctx, thinking = self._think(ctx, max_think_tokens, sp, seed, progress, draft, speculate)
        res = self._sample(ctx, sizes.pop(), ip, seed, progress)
        res.thinking = thinking
        return res

    # -- conversations -------------------------------------------------------------------------------------
    def conversation(self, think: Optional[str] = None, seed: int = 0, **defaults) -> "Conversation":
        """A multi-turn conversation (images in and out). ``think``: None, "gen" or "vlm" adds the official
        system prompt at the start. ``defaults`` override the per-call defaults of its methods."""
        return Conversation(self, think, seed, defaults)


    # -- interleaved generation ---------------------------------------------------------------------------
    def interleave(self, inputs, mode: str = "model", num_images: int = 1, image_size=None,
                   max_text_length: int = 500, max_interleaved_blocks: int = 8, think: bool = False,
                   max_think_tokens: Optional[int] = None, seed: int = 0, progress: bool = False,
                   on_item=None, **kw) -> InterleaveResult:
        """Interleaved text and image generation. Never raises for a failure midway:
        everything produced so far is returned with the error.

        Args:
          inputs: a prompt string, or a list of strings and images (the user turn, in order).
          mode: "model"    decode text; each ``<|vision_start|>`` the model emits (inside a text, or
                           right after the ``<|im_end|>`` closing it, where special-token training puts
                           it: :meth:`Conversation.next_is_image`) starts an image of ``image_size``;
                           continue until the turn ends (``<|im_end|>`` not followed by
                           ``<|vision_start|>``, or an empty text), ``max_text_length`` tokens in a
                           block, or ``max_interleaved_blocks`` blocks (text or image);
                "explicit" every ``<|vision_start|>`` marker in the prompt strings gets an image at that point;
                "auto"     ``num_images`` rounds of text -> image, then a closing text.
          think: thinking text (at most ``max_think_tokens`` fed tokens, default 1000) before each image,
            official GEN think system prompt at the start; it is an item ``("think", str)`` before its image.
          num_images: images in "auto" mode, an integer >= 0 (0: no image, only the closing text).
          on_item: called with each item as soon as it exists (e.g. to save it at once).
          kw: image / text hyperparameters (as :meth:`generate_image`; editing defaults are used when the
            context holds an input image, text-to-image defaults otherwise).
        Raises :class:`ValueError` before any compute for a request that cannot work (unknown mode, a bad
        ``num_images``, mode "explicit" without a ``<|vision_start|>`` marker).
        """
        return interleave(self, inputs, mode, num_images, image_size, max_text_length, max_interleaved_blocks,
                          think, max_think_tokens, seed, progress, on_item, **kw)

    # -- streaming (bagel_jax.inference.streaming) ---------------------------------------------------------
    def stream_understand(self, images, question, chunk: int = streaming.DEFAULT_CHUNK, **kw) -> streaming.Stream:
        """:meth:`understand` streamed: "text" pieces (``row`` = batch row), then "done" with the answer(s)."""
        return streaming.stream(self.understand, images, question, chunk=chunk, **kw)

    def stream_generate_image(self, prompt, chunk: int = streaming.DEFAULT_CHUNK, **kw) -> streaming.Stream:
        """:meth:`generate_image` streamed: "think" pieces (think mode), each "image", "done" (ImageResult)."""
        return streaming.stream(self.generate_image, prompt, chunk=chunk, **kw)

    def stream_edit_image(self, image, instruction, chunk: int = streaming.DEFAULT_CHUNK, **kw) -> streaming.Stream:
        """:meth:`edit_image` streamed: "think" pieces (think mode), each "image", "done" (ImageResult)."""
        return streaming.stream(self.edit_image, image, instruction, chunk=chunk, **kw)

    def stream_interleave(self, inputs, chunk: int = streaming.DEFAULT_CHUNK, on_item=None,
                          **kw) -> streaming.Stream:
        """:meth:`interleave` streamed: "text" / "think" pieces as decoded (an explicit-mode prompt segment
        whole), each "image" as soon as it is decoded, then "done" with the :class:`InterleaveResult`;
        :func:`streaming.collect_items` of the events equals its ``items``."""
        return streaming.stream(self.interleave, inputs, chunk=chunk, on_item=streaming.item_hook(on_item), **kw)
