"""Training hyper-parameters, the optax optimiser, freezing masks and EMA (docs/architecture.md#training-optimisation-and-freezing).

Official defaults: AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-15, weight decay 0; linear warm-up
(2000 steps) then constant, or cosine down to ``min_lr`` 1e-7; global-norm clipping 1.0; EMA decay
0.9999 on trainable parameters only, applied after every optimiser step; fp32 master weights.

Freezing: frozen parameters get ``stop_gradient`` in the forward and ``optax.set_to_zero`` (no optimiser
state). The VAE is never trained (its params are not in the train state). The two fixed sin-cos
position tables (``vit_pos_embed``, ``latent_pos_embed``) are never trained.
``freeze_und`` freezes the understanding expert (embedding, und projections / norms / MLPs, final
``norm``), the ViT and the connector; the gen expert, ``lm_head`` and the generation heads train. As in the
official code, the und *activations* are detached too (``ModelOptions.freeze_und``, which ``train.py``
sets from this flag), so no gradient reaches gen parameters through und tokens: the CE loss then trains
``lm_head`` only.
``trainable: connector`` trains the connector only (alignment stage).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from ..config import ConfigError, check_keys
from ..data.loader import check_numbers
from ..lora import LoraConfig
from ..nn import layer_loop as layer_loop_lib
from ..nn.layer_loop import validate as validate_layer_loop
from ..nn.options import ModelOptions


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4
    min_lr: float = 1e-7
    warmup_steps: int = 2000
    lr_schedule: str = "constant"          # constant | cosine
    total_steps: Optional[int] = None      # cosine horizon (default: --steps)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    accum_steps: int = 1
    ema_decay: float = 0.9999
    freeze_und: bool = False
    freeze_vit: bool = False
    freeze_llm: bool = False
    trainable: str = "all"                 # all | connector
    # the model's options (model_options: one ModelOptions, checked there)
    compute_dtype: str = "bfloat16"        # bfloat16 | float32 (master weights are always float32)
    remat_policy: str = "none"             # a key of nn/options.py REMAT_POLICIES
    attention_impl: str = "auto"           # auto | xla | blocked | pallas | cudnn (decoder and ViT)
    # how the step runs the layer stacks (bagel_jax/nn/layer_loop.py); the train state always holds them
    # stacked ("scan" layout), so checkpoints do not depend on it. "unrolled": the step slices the stacked
    # params per layer and runs a Python loop (no per-layer dynamic slices of weights and residuals;
    # compiles ~1.3x longer; on the 2-core CPU 5 % faster at 1k tokens, see docs/train_performance.md);
    # "auto" (the default): unrolled on a single CPU device, else scan
    layer_loop: str = "auto"
    # split the residual stream's sequence over the mesh's tensor axis (Megatron sequence parallelism);
    # what fits 36,864-token packs of BAGEL-7B in 64 GiB on 8 devices (fsdp 4 x tensor 2, docs/performance.md)
    seq_parallel: bool = False
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    ce_loss_reweighting: bool = False
    # CE tokens per chunk of the LM head + log-softmax inside the step (only one chunk's [chunk, vocab]
    # float32 logits live at a time, forward and backward; 1024 x 152064 x 4 B = 0.6 GiB at BAGEL-7B)
    ce_chunk_tokens: int = 1024
    # CE weight of special-token labels (text items with special_token_loss, packing's ce_special), by
    # token: {"<|vision_start|>": 2.0}; other CE entries with the same label keep weight 1
    special_token_weights: dict = dataclasses.field(default_factory=dict)
    seed: int = 4396
    save_every: int = 100
    keep_checkpoints: int = 3
    init: Any = "random"                   # "random" | official folder | {qwen2:, siglip:, ae:}
    peak_tflops_per_device: Optional[float] = None
    # a step whose loss, gradient norm or update norm is not finite never changes the weights; then
    # "stop": end the run (exit 1; the last good state is checkpointed, never the bad one) or
    # "skip": go on with the next batch, stopping after max_nonfinite_skips such steps in a row
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # low-rank adapters on a frozen base (rank > 0; train/lora.py, docs/lora.md): train.lora.rank=16 ...
    lora: LoraConfig = LoraConfig()

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        check_keys(TrainConfig, d, "train config")
        if "lora" in d:
            d = {**d, "lora": LoraConfig.from_dict(d["lora"] or {})}
        c = TrainConfig(**d)
        c.validate()
        return c

    @property
    def model_options(self) -> ModelOptions:
        """The model's options for this run: ``compute_dtype`` over float32 master weights, ``remat_policy``,
        ``attention_impl``, ``freeze_und`` (the und activations detached, as the freezing mask freezes its
        parameters) and ``seq_parallel``. The model is always built with its layer stacks stacked ("scan", the
        layout of the train state); ``layer_loop`` is how the step runs them (``train/step.py``)."""
        return ModelOptions(dtype=self.compute_dtype, param_dtype=jnp.float32, remat_policy=self.remat_policy,
                            attention_impl=self.attention_impl, freeze_und=self.freeze_und,
                            seq_parallel=self.seq_parallel)

    def validate(self) -> None:
        check_numbers(self, "train", ConfigError)
        for name in ("total_steps", "peak_tflops_per_device"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or v == float("inf")):
                raise ConfigError(f"train: {name} must be a finite number > 0 or null, got {v!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train: on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.max_nonfinite_skips < 1:
            raise ConfigError(f"train: max_nonfinite_skips must be >= 1, got {self.max_nonfinite_skips}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train: lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.trainable not in ("all", "connector"):
            raise ConfigError(f"train: trainable must be 'all' or 'connector', got {self.trainable!r}")
        try:   # the model's options are checked where they are made (ModelOptions), the step's layer loop by its module
            self.model_options  # noqa: B018
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        try:
            validate_layer_loop(self.layer_loop)
        except ValueError as e:
            raise ConfigError(f"train: layer_loop: {e}") from None
        if self.accum_steps < 1 or self.save_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("train: accum_steps, save_every and keep_checkpoints must be >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train: ema_decay must be in [0, 1), got {self.ema_decay}")
        if isinstance(self.ce_chunk_tokens, bool) or not isinstance(self.ce_chunk_tokens, int) or self.ce_chunk_tokens < 1:
            raise ConfigError(f"train: ce_chunk_tokens must be an integer >= 1, got {self.ce_chunk_tokens!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.min_lr < 0:
            raise ConfigError(f"train: need lr > 0 (got {self.lr}), min_lr >= 0 (got {self.min_lr}) and "
                              f"warmup_steps >= 0 (got {self.warmup_steps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps >= 0 and self.weight_decay >= 0
                and self.max_grad_norm >= 0 and self.ce_weight >= 0 and self.mse_weight >= 0):
            raise ConfigError("train: need beta1, beta2 in [0, 1) and eps, weight_decay, max_grad_norm, "
                              "ce_weight, mse_weight >= 0")


def lr_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 (official: ``lr * step / warmup``), then constant or cosine to ``min_lr``."""
    warm = max(tc.warmup_steps, 0)
    if tc.lr_schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(tc.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warm), optax.constant_schedule(tc.lr)], [warm])
    horizon = max((tc.total_steps or total_steps) - warm, 1)
    cos = optax.cosine_decay_schedule(tc.lr, horizon, alpha=tc.min_lr / tc.lr)
    if warm == 0:
        return cos
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warm), cos], [warm])


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_trainable(path: str, tc: TrainConfig) -> bool:
    if "pos_embed/" in path + "/" and re.search(r"(vit_pos_embed|latent_pos_embed)", path):
        return False
    if tc.trainable == "connector":
        return path.startswith("connector/")
    if tc.freeze_llm and path.startswith("language_model/"):
        return False
    if tc.freeze_vit and path.startswith("vit_model/"):
        return False
    if tc.freeze_und:
        if path.startswith(("vit_model/", "connector/")):
            return False
        if path.startswith("language_model/") and "_moe_gen" not in path and not path.startswith("language_model/lm_head"):
            return False
    return True


def trainable_mask(params, tc: TrainConfig):
    """Pytree of bools, True = trained."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable(_path(p), tc), params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` (same formula, same empty state) that takes the norm the train step has
    already computed as ``grad_norm=``: otherwise the update reads all gradients once more for it (on the perf
    harness's step, one core: optimizer op time 0.100 -> 0.092 s, docs/train_performance.md). Without
    ``grad_norm`` it computes the norm itself."""
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g = optax.global_norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g < max_norm)
        return jax.tree_util.tree_map(lambda t: jax.lax.select(trigger, t, (t / g.astype(t.dtype)) * max_norm),
                                      updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(tc: TrainConfig, mask, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping then AdamW on the trainable leaves, nothing on the frozen ones. Its ``update``
    takes the gradients' global norm as ``grad_norm=`` (the train step passes the one it reports)."""
    sched = lr_schedule(tc, total_steps)
    inner = optax.chain(
        clip_by_global_norm(tc.max_grad_norm),
        optax.adamw(sched, b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay),
    )
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", mask)
    # labels follow the layout of the tree they are applied to: a mask of stacked layer params also serves a
    # train state that holds them per layer (init_state on one CPU device, train/step.py)
    return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()},
                                 lambda tree: layer_loop_lib.like(labels, tree))


def freeze(params, mask):
    mask = layer_loop_lib.like(mask, params)
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)


def ema_update(ema, params, mask, decay: float):
    """``ema <- decay * ema + (1 - decay) * params`` on trainable leaves (fp32)."""
    mask = layer_loop_lib.like(mask, params)
    return jax.tree_util.tree_map(
        lambda e, p, t: (e * decay + p.astype(e.dtype) * (1.0 - decay)) if t else e, ema, params, mask)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


def count_params(tree, mask=None) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if mask is None:
        return int(sum(x.size for x in leaves))
    return int(sum(x.size for x, t in zip(leaves, jax.tree_util.tree_leaves(mask)) if t))
