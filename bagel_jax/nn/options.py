"""Model-wide options, given once to :class:`bagel_jax.models.bagel.Bagel` and passed down unchanged.

:class:`ModelOptions` holds what every module of the decoder and the ViT needs and no config file
describes (the config is the architecture; these are how to run it): compute dtype, parameter dtype,
activation-checkpointing (remat) policy, attention implementation, weight quantization, layer loop and
activation sharding. It is the one interface of these choices from the entry points down:
``bagel_jax.load(folder, options=...)``, :func:`bagel_jax.loading.build_modules` /
:func:`~bagel_jax.loading.load_model` and the trainer (``TrainConfig.model_options``) all take it, and
it is the one place they are checked. :data:`REMAT_POLICIES` is the one table of remat policies (decoder
layers and ViT layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import sharding as shd
from ..quantize import validate_mode
from . import layer_loop as layer_loop_lib
from .attention import default_auto_min_len, validate_implementation
from .layers import Dense, QuantDense
from .lora import LoraDense

# name -> jax.checkpoint policy (None: no remat). One table for every scanned layer stack.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,                 # recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
    "dots_all": jax.checkpoint_policies.dots_saveable,                 # keep every matmul output
}


DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def as_dtype(d):
    """A dtype given by name ("float32" / "fp32", "bfloat16" / "bf16") or as a dtype."""
    if isinstance(d, str):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[d]
    return d


def validate_remat_policy(name: str) -> str:
    """``name`` if it is a key of :data:`REMAT_POLICIES`, else a ValueError naming the choices."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run the model (hashable: a field of the Flax modules, part of jit cache keys).

    Attributes:
      dtype: compute dtype of activations and matmuls (norm statistics and softmax stay float32); a dtype or
        a name of :data:`DTYPES`.
      param_dtype: storage dtype of the parameters (None, the default: ``dtype``).
      remat_policy: a key of :data:`REMAT_POLICIES`, applied to every decoder and ViT layer.
      attention_impl: ``"auto"`` or an implementation of :func:`bagel_jax.nn.attention.attention`
        (decoder and ViT).
      auto_blocked_min_len: with ``"auto"``, attention without a cache over more keys than this runs
        ``"blocked"``, else ``"xla"`` (:func:`bagel_jax.nn.attention.resolve_implementation`). None (the
        default): the backend's value, :func:`bagel_jax.nn.attention.default_auto_min_len` (training);
        ``bagel_jax.load`` fills in that function's inference value (:meth:`for_inference`).
      layer_loop: ``"scan"`` (parameters stacked over layers, one scanned body) or ``"unrolled"`` (per-layer
        parameter arrays, a Python loop; single-device CPU inference): :mod:`bagel_jax.nn.layer_loop`.
        ``"auto"``: :func:`bagel_jax.nn.layer_loop.resolve` on the mesh, done by
        :func:`bagel_jax.loading.build_modules` (:meth:`resolve`), so the modules only ever see the other two.
      quantize: ``"none"`` or ``"int8"`` (:mod:`bagel_jax.quantize`): with ``"int8"`` every dense layer is a
        :class:`~bagel_jax.nn.layers.QuantDense`, which runs an int8 kernel where the params tree holds one
        (the layers :func:`bagel_jax.quantize.quantize_params` converted) and the float kernel elsewhere.
      quantize_vit: with ``quantize="int8"``, the loader quantizes the ViT layers' linears too (by default the
        decoder layers only; :func:`bagel_jax.loading.load_model`).
      freeze_und: training with the understanding expert frozen as the official code does it
        (docs/architecture.md#training-optimisation-and-freezing): the decoder's und-token activations are detached
        everywhere (input embeddings, q/k after their norms, v, attention and MLP outputs, the final norm), so no
        gradient flows through und tokens and only gen-expert tokens (and the heads) carry gradients. No effect on
        values.
      seq_parallel: on a mesh, split the residual stream's sequence over the ``tensor`` axis (Megatron sequence
        parallelism; :mod:`bagel_jax.sharding`). No effect on values or on one device.
      lora: every dense layer is a :class:`~bagel_jax.nn.lora.LoraDense`, which adds the low-rank adapter the
        params tree holds beside a kernel (:func:`bagel_jax.lora.attach`; docs/lora.md); ``lora_dropout``: the
        adapter's input dropout when the ``lora_dropout`` rng stream is given (training).
    Names are checked at construction, so a bad value fails where it is given, not at model build.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = None
    remat_policy: str = "none"
    attention_impl: str = "auto"
    quantize: str = "none"
    layer_loop: str = "scan"
    auto_blocked_min_len: Optional[int] = None
    freeze_und: bool = False
    seq_parallel: bool = False
    quantize_vit: bool = False
    lora: bool = False
    lora_dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(as_dtype(self.dtype)))
        pd = self.dtype if self.param_dtype is None else as_dtype(self.param_dtype)
        object.__setattr__(self, "param_dtype", jnp.dtype(pd))
        object.__setattr__(self, "attention_impl", validate_implementation(self.attention_impl))
        validate_remat_policy(self.remat_policy)
        validate_mode(self.quantize)
        layer_loop_lib.validate(self.layer_loop)
        if not isinstance(self.quantize_vit, bool):
            raise ValueError(f"quantize_vit must be True or False, got {self.quantize_vit!r}")
        if self.quantize_vit and self.quantize == "none":
            raise ValueError("quantize_vit=True needs quantize='int8'")
        n = self.auto_blocked_min_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"auto_blocked_min_len must be None or an integer >= 0, got {n!r}")
        if not isinstance(self.freeze_und, bool):
            raise ValueError(f"freeze_und must be True or False, got {self.freeze_und!r}")
        if not isinstance(self.seq_parallel, bool):
            raise ValueError(f"seq_parallel must be True or False, got {self.seq_parallel!r}")

    def resolve(self, mesh=None) -> "ModelOptions":
        """These options with ``layer_loop="auto"`` resolved for ``mesh`` (None: one device) by
        :func:`bagel_jax.nn.layer_loop.resolve`; unchanged otherwise."""
        if self.layer_loop != "auto":
            return self
        return dataclasses.replace(self, layer_loop=layer_loop_lib.resolve("auto", mesh))

    def for_inference(self) -> "ModelOptions":
        """These options for a forward-only model: an unset ``auto_blocked_min_len`` becomes the backend's
        inference value (:func:`bagel_jax.nn.attention.default_auto_min_len`, measured for forward passes)."""
        if self.auto_blocked_min_len is not None:
            return self
        return dataclasses.replace(self, auto_blocked_min_len=default_auto_min_len(inference=True))

    @property
    def activation_rules(self) -> Mapping:
        """The logical-axis -> mesh-axis table the modules pass to :func:`bagel_jax.sharding.constrain`."""
        return shd.with_rules(res_length="tensor") if self.seq_parallel else shd.ACTIVATION_RULES

    def dense(self, features: int, use_bias: bool = True, name: str | None = None) -> nn.Dense:
        """An ``nn.Dense`` in these dtypes (a :class:`~bagel_jax.nn.layers.QuantDense` when quantized)."""
        if self.lora:
            return LoraDense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                             dropout=self.lora_dropout)
        cls = Dense if self.quantize == "none" else QuantDense
        return cls(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def remat(self, module_cls, static_argnums=()):
        """``module_cls`` wrapped with ``nn.remat`` under :attr:`remat_policy` (as is for "none")."""
        if self.remat_policy == "none":
            return module_cls
        return nn.remat(module_cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False,
                        static_argnums=static_argnums)


def options_with(options: Optional[ModelOptions] = None, **fields) -> ModelOptions:
    """``options`` with some fields given by keyword (the conveniences of ``bagel_jax.load``,
    :func:`bagel_jax.loading.build_modules` and :func:`~bagel_jax.loading.load_model`): without ``options``,
    ``ModelOptions(**fields)`` (so ``param_dtype`` follows ``dtype``); with it, those fields replaced. A name
    that is not a field is a TypeError listing the fields."""
    if options is not None and not isinstance(options, ModelOptions):
        raise TypeError(f"options must be a ModelOptions, got {options!r}")
    names = [f.name for f in dataclasses.fields(ModelOptions)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; ModelOptions fields: {', '.join(names)}")
    if options is None:
        return ModelOptions(**fields)
    return dataclasses.replace(options, **fields) if fields else options
