"""Small shared building blocks: a Linear carrying logical axes, and the SwiGLU MLP."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

_INIT = nnx.initializers.normal(0.02)

# A product of a single row with a weight matrix (batch-1 decode) is computed as two rows, the second zero. XLA's GPU
# compiler rewrites a vector-matrix product whose operands hold fewer than 10M elements (q/k/v/o-sized weights of the
# 4B model) into an elementwise multiply and a reduction, which writes the whole [in, out] product to memory and reads
# it back; a two-row product stays a GEMM that reads the weight once. The extra row costs no extra weight traffic.
# "gpu": only when the default backend is a GPU; True / False: always / never.
SINGLE_ROW_AS_TWO: bool | str = "gpu"


def _two_rows() -> bool:
    if SINGLE_ROW_AS_TWO == "gpu":
        return jax.default_backend() == "gpu"
    return bool(SINGLE_ROW_AS_TWO)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``jax.lax.dot_general`` for ``nnx.Linear`` (``x [..., in] @ kernel [in, out]``), with one input row padded to
    two (``SINGLE_ROW_AS_TWO``). Results are those of the plain product."""
    (lc, rc), (lb, rb) = dimension_numbers
    plain = not _two_rows() or rhs.ndim != 2 or lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,)
    if plain or math.prod(lhs.shape[:-1]) != 1:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    x = lhs.reshape(1, lhs.shape[-1])
    y = jax.lax.dot_general(jnp.concatenate([x, jnp.zeros_like(x)]), rhs, (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
    return y[:1].reshape(*lhs.shape[:-1], rhs.shape[1])


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, use_bias: bool = False,
           dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, kernel_init=_INIT) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` and bias ``[out]`` carry logical axis names for sharding."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(), dot_general=dot_general, rngs=rngs,
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
