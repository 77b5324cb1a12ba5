"""Small shared building blocks: a Linear carrying logical axes, and the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_INIT = nnx.initializers.normal(0.02)


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, use_bias: bool = False,
           dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, kernel_init=_INIT) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` and bias ``[out]`` carry logical axis names for sharding."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(), rngs=rngs,
        kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": (axes[1],)},
    )


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``. The language stack has no biases, the vision tower has them."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool = False, axes=("embed", "mlp"), dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(hidden, intermediate, axes, **kw)
        self.up_proj = linear(hidden, intermediate, axes, **kw)
        self.down_proj = linear(intermediate, hidden, (axes[1], axes[0]), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
