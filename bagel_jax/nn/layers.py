"""Small building blocks shared by the BAGEL modules: RMSNorm, RoPE, position tables, timestep features and
the dense layer that also runs int8 kernels (:class:`QuantDense`)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def packed_row(shape) -> bool:
    """Whether ``shape`` is one packed row ``[1, .., 1, seq, d]`` (every axis before the last two of size 1).
    XLA:CPU compiles some backward ops over such an input much slower than over the same ``[seq, d]``
    (:class:`Dense`, :class:`RMSNorm`), so those layers compute on the 2-D view."""
    return len(shape) > 2 and all(d == 1 for d in shape[:-2])


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm (docs/architecture.md#building-blocks): normalise in float32, cast back to the input dtype, then
    scale."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        shape = x.shape
        if packed_row(shape):
            # the same values computed on [seq, d]. With the size-1 axis, XLA:CPU's backward reductions (the
            # scale's gradient over tokens, the row sums of the input gradient) ran 10-30x slower than the same
            # reductions alone: the perf harness's step spent 141 ms per step in the decoder's norms, 58 ms
            # without (docs/train_performance.md). (Dropping only the leading 1 of the q / k norms'
            # [1, seq, heads, d] made theirs slower: they keep it.)
            x = x.reshape(shape[-2:])
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(x.dtype) * y.astype(x.dtype)).reshape(shape)


class Dense(nn.Dense):
    """``nn.Dense`` (same parameters, same values) whose matmul sees a 2-D ``[tokens, in]`` operand when the
    leading axes of the input are all of size 1 (a packed row ``[1, seq, in]``, under ``vmap`` over one
    pack). XLA:CPU compiles the weight gradient of a dot whose token contraction spans size-1 axes with a
    transposing copy of the output gradient (a loop fusion writing ``[out, tokens]`` column by column);
    with one token axis it reads the gradient in place."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not packed_row(inputs.shape):
            return super().__call__(inputs)
        y = super().__call__(inputs.reshape(inputs.shape[-2:]))
        return y.reshape(inputs.shape[:-2] + y.shape)


class QuantDense(Dense):
    """``nn.Dense`` (same parameters, same float result) that also runs a weight-only int8 kernel: when the
    params tree holds a ``scale`` ``[features]`` beside an int8 ``kernel`` ``[in, features]`` (made by
    :func:`bagel_jax.quantize.quantize_params`), ``y = (x @ kernel.astype(dtype)) * scale + bias``: the
    int8 -> dtype conversion is part of the matmul's program, the float kernel is never stored."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not self.has_variable("params", "scale"):
            return super().__call__(inputs)
        # the init (float) only gives Flax the expected shape to check; the stored kernel is int8
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        dtype = self.dtype or jnp.result_type(inputs, self.param_dtype)
        y = jax.lax.dot_general(inputs.astype(dtype), kernel.astype(dtype),
                                (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        y = y * scale.astype(dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
        return y


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """``inv_freq[j] = theta^(-2j/head_dim)`` in float32, as the HF rotary embedding computes it."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[batch, seq, head_dim]`` for integer positions ``[batch, seq]`` (rotate-half layout)."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim/2]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [batch, seq, heads, head_dim]``; HF "rotate-half" convention (not interleaved pairs)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
    """Fixed 2D sin-cos table ``[grid*grid, dim]`` (docs/architecture.md#rope), row ``r*grid + c``.

    First half of the channels encodes the column, the second half the row; each half is
    ``[sin(pos*omega), cos(pos*omega)]`` with ``omega[k] = 10000^(-k/(dim/4))``. Built in float64.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width {dim} must be divisible by 4")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def e1(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([e1(cols), e1(rows)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """``[cos(t*f), sin(t*f)]`` (cos first), ``f[k] = exp(-ln(max_period) k / (dim/2))``; t in [0, 1], unscaled."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)
