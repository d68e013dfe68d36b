"""Model-wide options, given once to :class:`bagel_jax.models.bagel.Bagel` and passed down unchanged.

:class:`ModelOptions` holds what every module of the decoder and the ViT needs and no config file
describes (the config is the architecture; these are how to run it): compute dtype, parameter dtype,
activation-checkpointing (remat) policy, attention implementation and weight quantization. :data:`REMAT_POLICIES` is the
one table of remat policies (decoder layers and ViT layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import sharding as shd
from ..quantize import validate_mode
from .attention import validate_implementation
from .layer_loop import validate as validate_layer_loop
from .layers import Dense, QuantDense

# name -> jax.checkpoint policy (None: no remat). One table for every scanned layer stack.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,                 # recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
    "dots_all": jax.checkpoint_policies.dots_saveable,                 # keep every matmul output
}


def validate_remat_policy(name: str) -> str:
    """``name`` if it is a key of :data:`REMAT_POLICIES`, else a ValueError naming the choices."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return name


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run the model (hashable: a field of the Flax modules, part of jit cache keys).

    Attributes:
      dtype: compute dtype of activations and matmuls (norm statistics and softmax stay float32).
      param_dtype: storage dtype of the parameters.
      remat_policy: a key of :data:`REMAT_POLICIES`, applied to every decoder and ViT layer.
      attention_impl: ``"auto"`` or an implementation of :func:`bagel_jax.nn.attention.attention`
        (decoder and ViT).
      auto_blocked_min_len: with ``"auto"``, attention without a cache over more keys than this runs
        ``"blocked"``, else ``"xla"`` (:func:`bagel_jax.nn.attention.resolve_implementation`). None (the
        default): the backend's value, :func:`bagel_jax.nn.attention.default_auto_min_len` (training); the
        inference engine sets that function's inference value.
      layer_loop: ``"scan"`` (parameters stacked over layers, one scanned body) or ``"unrolled"`` (per-layer
        parameter arrays, a Python loop; single-device CPU inference): :mod:`bagel_jax.nn.layer_loop`.
      quantize: ``"none"`` or ``"int8"`` (:mod:`bagel_jax.quantize`): with ``"int8"`` every dense layer is a
        :class:`~bagel_jax.nn.layers.QuantDense`, which runs an int8 kernel where the params tree holds one
        (the layers :func:`bagel_jax.quantize.quantize_params` converted) and the float kernel elsewhere.
      freeze_und: training with the understanding expert frozen as the official code does it
        (docs/architecture.md#training-optimisation-and-freezing): the decoder's und-token activations are detached
        everywhere (input embeddings, q/k after their norms, v, attention and MLP outputs, the final norm), so no
        gradient flows through und tokens and only gen-expert tokens (and the heads) carry gradients. No effect on
        values.
      seq_parallel: on a mesh, split the residual stream's sequence over the ``tensor`` axis (Megatron sequence
        parallelism; :mod:`bagel_jax.sharding`). No effect on values or on one device.
    Names are checked at construction, so a bad value fails where it is given, not at model build.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "auto"
    quantize: str = "none"
    layer_loop: str = "scan"
    auto_blocked_min_len: Optional[int] = None
    freeze_und: bool = False
    seq_parallel: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "attention_impl", validate_implementation(self.attention_impl))
        validate_remat_policy(self.remat_policy)
        validate_mode(self.quantize)
        validate_layer_loop(self.layer_loop, auto=False)
        n = self.auto_blocked_min_len
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"auto_blocked_min_len must be None or an integer >= 0, got {n!r}")
        if not isinstance(self.freeze_und, bool):
            raise ValueError(f"freeze_und must be True or False, got {self.freeze_und!r}")
        if not isinstance(self.seq_parallel, bool):
            raise ValueError(f"seq_parallel must be True or False, got {self.seq_parallel!r}")

    @property
    def activation_rules(self) -> dict:
        """The logical-axis -> mesh-axis table the modules pass to :func:`bagel_jax.sharding.constrain`."""
        return shd.with_rules(res_length="tensor") if self.seq_parallel else shd.ACTIVATION_RULES

    def dense(self, features: int, use_bias: bool = True, name: str | None = None) -> nn.Dense:
        """An ``nn.Dense`` in these dtypes (a :class:`~bagel_jax.nn.layers.QuantDense` when quantized)."""
        cls = Dense if self.quantize == "none" else QuantDense
        return cls(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def remat(self, module_cls, static_argnums=()):
        """``module_cls`` wrapped with ``nn.remat`` under :attr:`remat_policy` (as is for "none")."""
        if self.remat_policy == "none":
            return module_cls
        return nn.remat(module_cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False,
                        static_argnums=static_argnums)
