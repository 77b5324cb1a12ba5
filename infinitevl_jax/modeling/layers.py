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
    x = pad_rows(lhs.reshape(1, lhs.shape[-1]), 2)
    y = jax.lax.dot_general(x, rhs, (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
    return y[:1].reshape(*lhs.shape[:-1], rhs.shape[1])


def padded_row_count(rows: int) -> int:
    """The rows a product of ``rows`` input rows runs with: 2 for a single row under ``SINGLE_ROW_AS_TWO``."""
    return 2 if rows == 1 and _two_rows() else rows


def padded_rows(lin: nnx.Linear, x: jax.Array) -> jax.Array:
    """``lin(x)`` for ``x [R, in]`` as ``[R', out]``, R' >= R, the rows past R being padding: a single row is the
    padded two-row product (``SINGLE_ROW_AS_TWO``) kept at two rows, for consumers that read only the first (a
    slice feeding a custom call would be one more copy kernel)."""
    return lin(pad_rows(x, padded_row_count(x.shape[0])))


def check_step_rows(rows: int, batch: int, tokens: int) -> None:
    """A cached step's input may carry the padding rows of its products (``rows == padded_row_count(batch)``, one
    token per row: ``HybridStack.step``) or none; anything else is a caller's mistake."""
    if rows != batch and (tokens != 1 or rows != padded_row_count(batch)):
        raise ValueError(f"step input has {rows} rows for a cache of batch {batch} ({tokens} tokens per row): expected "
                         f"{batch}" + (f" or {padded_row_count(batch)} (padded decode rows)" if tokens == 1 else ""))


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """``x [B, ...]`` followed by zero rows up to ``rows``."""
    if rows == x.shape[0]:
        return x
    return jnp.concatenate([x, jnp.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, use_bias: bool = False,
           dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, kernel_init=_INIT) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` and bias ``[out]`` carry logical axis names for sharding."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=nnx.initializers.zeros_init(), dot_general=dot_general, rngs=rngs,
        kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": (axes[1],)},
    )


def fuse_linears(linears, *, delete: bool = False) -> nnx.Linear:
    """One ``nnx.Linear`` computing the given linears (same input size) side by side: kernels (and biases)
    concatenated along the output axis. One product then reads every weight in a single GEMM (inference: a decode
    step is a chain of weight reads, and each separate small GEMM costs a launch and runs below the bandwidth a
    larger one reaches). ``delete=True`` frees the source arrays once the fused copy exists. Split the result with
    ``split_last(y, [l.out_features for l in linears])``."""
    first = linears[0]
    if any(l.in_features != first.in_features or (l.bias is None) != (first.bias is None) for l in linears):
        raise ValueError("fuse_linears: the linears must share the input size and all have (or all lack) a bias")
    kernel = jnp.concatenate([l.kernel[...] for l in linears], axis=1)
    bias = None if first.bias is None else jnp.concatenate([l.bias[...] for l in linears])
    axes = first.kernel.get_metadata().get("logical_axes", (None, None))
    fused = nnx.eval_shape(lambda: linear(first.in_features, kernel.shape[1], axes, use_bias=bias is not None,
                                          dtype=first.dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
    fused.kernel.set_value(kernel)
    if bias is not None:
        fused.bias.set_value(bias)
    if delete:
        for l in linears:
            for v in (l.kernel, l.bias):
                if v is not None and isinstance(v[...], jax.Array) and not v[...].is_deleted():
                    v[...].delete()
    return fused


def split_last(y: jax.Array, sizes) -> tuple[jax.Array, ...]:
    """``y [..., sum(sizes)]`` as consecutive pieces of the given sizes along the last axis."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    if offsets[-1] != y.shape[-1]:
        raise ValueError(f"split_last: sizes {tuple(sizes)} do not add up to {y.shape[-1]}")
    return tuple(y[..., a:b] for a, b in zip(offsets[:-1], offsets[1:]))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``. The language stack has no biases, the vision tower has them."""

    def __init__(self, hidden: int, intermediate: int, *, use_bias: bool = False, axes=("embed", "mlp"), dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(hidden, intermediate, axes, **kw)
        self.up_proj = linear(hidden, intermediate, axes, **kw)
        self.down_proj = linear(intermediate, hidden, (axes[1], axes[0]), **kw)
        self.gate_up_proj = nnx.data(None)  # inference: gate and up as one product (``fuse_projections``)

    def fuse_projections(self, *, delete: bool = False) -> None:
        """Replace ``gate_proj`` and ``up_proj`` by one ``gate_up_proj`` (same results; see ``fuse_linears``)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = nnx.data(fuse_linears([self.gate_proj, self.up_proj], delete=delete))
            self.gate_proj = self.up_proj = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gate_up_proj is not None:
            gate, up = split_last(self.gate_up_proj(x), [self.down_proj.in_features] * 2)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)
