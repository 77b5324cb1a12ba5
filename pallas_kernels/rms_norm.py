"""RMSNorm, and the residual add in front of it as one GPU kernel for a few rows (decode).

In a decoder step every norm follows a residual add: ``s = x + delta`` (the previous mixer's or MLP's output), then
``h = scale * s / rms(s)``. For the few rows of a decode step XLA makes that two or three launches (the add, the sum
of squares, the normalisation, which it may also fold into the next product's operand at some cost to that GEMM);
each takes ~1.3-1.5 us on an H100/H200 for a few KB of data. `add_rms_norm` does it in one Pallas Triton kernel,
one program per row, writing both the new residual and the normalised row.

`rms_norm` and `add_rms_norm_reference` are the definitions (the model's norm is `rms_norm`); the kernel computes the
same roundings in the same order: the add in the inputs' dtype, the norm in float32, the scale applied after the
cast back, as Qwen2RMSNorm and fla's RMSNorm do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _compat

BACKENDS = ("auto", "xla", "pallas_gpu")
MAX_KERNEL_ROWS = 64  # "auto": more rows than this (prefill, training) stay with XLA
NUM_WARPS = 8


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis, in float32, cast back to ``x``'s dtype."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(dtype) * x32.astype(dtype) if dtype != jnp.float32 else scale * x32


def add_rms_norm_reference(x, delta, scale, eps):
  """``(s, rms_norm(s))`` with ``s = x + delta``."""
  s = x + delta
  return s, rms_norm(s, scale, eps)


def supported(dim: int) -> bool:
  """Rows the kernel takes whole: a power of two (a Triton block) up to 16384."""
  return 16 <= dim <= 16384 and dim & (dim - 1) == 0


def resolve_backend(backend: str, rows: int, dim: int) -> str:
  """"pallas_gpu" asks for the kernel; "auto" takes it on a CUDA GPU of compute capability >= 8.0 for at most
  ``MAX_KERNEL_ROWS`` rows whose size it supports; otherwise (and for "xla") the reference."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "pallas_gpu":
    if not supported(dim):
      raise ValueError(f"pallas_gpu add_rms_norm does not support rows of {dim}")
    return backend
  if backend == "auto" and rows <= MAX_KERNEL_ROWS and supported(dim) and _compat.sm80_gpu():
    return "pallas_gpu"
  return "xla"


def _kernel(x_ref, d_ref, w_ref, s_ref, h_ref, *, eps):
  dtype = s_ref.dtype
  s = (x_ref[...].astype(jnp.float32) + d_ref[...].astype(jnp.float32)).astype(dtype)
  s_ref[...] = s
  s32 = s.astype(jnp.float32)
  n = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
  if dtype == jnp.float32:
    h_ref[...] = w_ref[...].astype(jnp.float32) * n
  else:
    h_ref[...] = w_ref[...].astype(dtype) * n.astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps",))
def add_rms_norm_gpu(x, delta, scale, eps):
  """The kernel: ``x, delta [..., D]`` (same shape), ``scale [D]``."""
  shape, D = x.shape, x.shape[-1]
  rows = x.reshape(-1, D)
  row = pl.BlockSpec((1, D), lambda i: (i, 0))
  s, h = pl.pallas_call(
      functools.partial(_kernel, eps=eps),
      grid=(rows.shape[0],),
      in_specs=[row, row, pl.BlockSpec((1, D), lambda i: (0, 0))],
      out_specs=[row, row],
      out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype)] * 2,
      compiler_params=_compat.triton_params(num_warps=NUM_WARPS, num_stages=1),
      interpret=_compat.gpu_interpret(),
      name="add_rms_norm",
  )(rows, delta.reshape(rows.shape).astype(x.dtype), scale.reshape(1, D))
  return s.reshape(shape), h.reshape(shape)


def add_rms_norm(x, delta, scale, eps, *, backend="auto"):
  """``(x + delta, rms_norm(x + delta, scale, eps))`` by ``backend`` ("auto", "xla" or "pallas_gpu").
  Forward only in the kernel (inference); differentiate through "xla"."""
  if x.shape != delta.shape:
    raise ValueError(f"add_rms_norm: x {x.shape} and delta {delta.shape} must have the same shape")
  if scale.shape != x.shape[-1:]:
    raise ValueError(f"add_rms_norm: scale must be [{x.shape[-1]}], got {scale.shape}")
  rows = x.size // x.shape[-1]
  # the kernel adds in x's dtype; operands of different dtypes take the reference's promotion instead
  if resolve_backend(backend, rows, x.shape[-1]) == "pallas_gpu" and x.dtype == delta.dtype:
    return add_rms_norm_gpu(x, delta, scale, eps)
  return add_rms_norm_reference(x, delta, scale, eps)
