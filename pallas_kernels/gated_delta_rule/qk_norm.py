"""q/k rows for the chunked kernels on GPU: L2-normalise (optional) and scale, both arrays in one Triton kernel.

`normalise(q, k, scale, l2norm)` returns `((l2norm(q) * scale).astype(dtype), l2norm(k).astype(dtype))` with
dtype = q's, rows in any [..., K] layout, computed in float32 as `naive.l2norm` does. Its VJP is XLA's VJP of that
formula (`reference`), so only the forward pass changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat
from .naive import L2NORM_EPS, l2norm

ROWS = 64  # rows per program


def reference(q, k, scale, use_l2norm):
  cdt = q.dtype
  if use_l2norm:
    q, k = l2norm(q), l2norm(k)
  return (q.astype(jnp.float32) * scale).astype(cdt), k.astype(cdt)


def _kernel(q_ref, k_ref, qo_ref, ko_ref, *, scale, use_l2norm):
  for x_ref, o_ref, s in ((q_ref, qo_ref, scale), (k_ref, ko_ref, None)):
    x = x_ref[...].astype(jnp.float32)
    if use_l2norm:
      x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)
    if s is not None:
      x = x * s
    o_ref[...] = x.astype(o_ref.dtype)


def _call(q, k, scale, use_l2norm):
  shape, K = q.shape, q.shape[-1]
  q2, k2 = q.reshape(-1, K), k.reshape(-1, K).astype(q.dtype)
  R = q2.shape[0]
  spec = pl.BlockSpec((ROWS, K), lambda i: (i, 0))
  qo, ko = pl.pallas_call(
      functools.partial(_kernel, scale=scale, use_l2norm=use_l2norm), grid=(R // ROWS,),
      in_specs=[spec, spec], out_specs=[spec, spec],
      out_shape=[jax.ShapeDtypeStruct(q2.shape, q.dtype)] * 2,
      compiler_params=_compat.triton_params(num_warps=4, num_stages=2), interpret=_compat.gpu_interpret(),
      name="gdn_qk_norm",
  )(q2, k2)
  return qo.reshape(shape), ko.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _normalise(q, k, scale, use_l2norm):
  return _call(q, k, scale, use_l2norm)


def _normalise_fwd(q, k, scale, use_l2norm):
  return _call(q, k, scale, use_l2norm), (q, k)


def _normalise_bwd(scale, use_l2norm, res, cts):
  _, vjp = jax.vjp(lambda q, k: reference(q, k, scale, use_l2norm), *res)
  return vjp(cts)


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


def normalise(q, k, scale, use_l2norm):
  """The kernel where the rows tile into programs (K a power of two, rows a multiple of ROWS, scale a Python
  number), else `reference`."""
  K = q.shape[-1]
  rows = q.size // K
  if (isinstance(scale, (int, float)) and K & (K - 1) == 0 and rows % ROWS == 0 and q.shape == k.shape):
    return _normalise(q, k, float(scale), bool(use_l2norm))
  return reference(q, k, scale, use_l2norm)
