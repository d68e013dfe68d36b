"""The dense layer that adds a low-rank adapter (LoRA) to its frozen kernel (docs/lora.md).

:class:`LoraDense` is what ``ModelOptions(lora=True).dense`` builds. Where the params tree holds
``lora_a`` ``[in, rank]`` and ``lora_b`` ``[rank, features]`` beside the kernel (put there by
:func:`bagel_jax.lora.attach`, which folds the ``alpha / rank`` scale into ``lora_b``), it computes
``y = dense(x) + (dropout(x) @ lora_a) @ lora_b``; the base may be a float or an int8 kernel
(:class:`~bagel_jax.nn.layers.QuantDense`). A layer without adapter leaves is the base layer alone, so one
model definition runs adapted and plain projections. The adapter never creates parameters at init: the
model's parameter shapes are the base model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .layers import QuantDense

DROPOUT_RNG = "lora_dropout"   # the rng stream of adapter dropout (training only; no stream = no dropout)


class LoraDense(QuantDense):
    """:class:`~bagel_jax.nn.layers.QuantDense` plus an optional low-rank update read from the params tree."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        if not self.has_variable("params", "lora_a"):
            return y
        a = self.get_variable("params", "lora_a")          # [in, rank]
        b = self.get_variable("params", "lora_b")          # [rank, features], alpha / rank folded in
        dtype = y.dtype
        x = inputs.astype(dtype)
        if self.dropout > 0 and self.has_rng(DROPOUT_RNG):
            keep = jax.random.bernoulli(self.make_rng(DROPOUT_RNG), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
        return y + (x @ a.astype(dtype)) @ b.astype(dtype)
