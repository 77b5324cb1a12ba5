"""RMSNorm, computed in float32 and cast back (as Qwen2RMSNorm / fla's RMSNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * x32.astype(dtype) if dtype != jnp.float32 else scale * x32


class RMSNorm(nnx.Module):
    """``scale * x / rms(x)`` over the last axis; ``scale`` is ``[dim]``, initialised to ones."""

    def __init__(self, dim: int, *, eps: float, axes: tuple[str | None, ...] = ("norm",), param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
