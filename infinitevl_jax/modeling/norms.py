"""RMSNorm, computed in float32 and cast back (as Qwen2RMSNorm / fla's RMSNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax import ops
from pallas_kernels.rms_norm import rms_norm  # noqa: F401  (the definition; re-exported)


class RMSNorm(nnx.Module):
    """``scale * x / rms(x)`` over the last axis; ``scale`` is ``[dim]``, initialised to ones."""

    def __init__(self, dim: int, *, eps: float, axes: tuple[str | None, ...] = ("norm",), param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)

    def add_and_norm(self, x: jax.Array, delta: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """``(x + delta, self(x + delta))`` (``delta=None``: ``(x, self(x))``), through ``ops.add_rms_norm`` (one
        kernel for the few rows of a decode step on GPUs)."""
        if delta is None:
            return x, self(x)
        return ops.add_rms_norm(x, delta, self.scale[...], self.eps)
