"""Chunk-parallel kernels shared by the TPU and GPU backends (grid = heads x chunks, one chunk per program).

The bodies are the per-chunk algebra of `chunk_math` applied to loaded blocks; only the compiler parameters
and interpret mode differ between Mosaic TPU and Triton.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import chunk_math as cm


def _row_spec(C, d):
  return pl.BlockSpec((None, C, d), lambda n, c: (n, c, 0))


def _state_spec(K, V):
  return pl.BlockSpec((None, None, K, V), lambda n, c: (n, c, 0, 0))


def _wu_kernel(k_ref, v_ref, gam_ref, beta_ref, m_ref, seg_ref, w_ref, u_ref):
  w, u = cm.chunk_wu(k_ref[...], v_ref[...], gam_ref[...], beta_ref[...], m_ref[...], seg_ref[...])
  w_ref[...] = w.astype(w_ref.dtype)
  u_ref[...] = u.astype(u_ref.dtype)


def wu_call(k, v, gam, beta, m, seg, *, chunk_size, compiler_params, interpret):
  """w [N,Tp,K], u [N,Tp,V] in k.dtype."""
  N, Tp, K = k.shape
  V = v.shape[-1]
  C = chunk_size
  col = _row_spec(C, 1)
  return pl.pallas_call(
      _wu_kernel, grid=(N, Tp // C),
      in_specs=[_row_spec(C, K), _row_spec(C, V), col, col, col, col],
      out_specs=[_row_spec(C, K), _row_spec(C, V)],
      out_shape=[jax.ShapeDtypeStruct((N, Tp, K), k.dtype), jax.ShapeDtypeStruct((N, Tp, V), k.dtype)],
      compiler_params=compiler_params, interpret=interpret, name="gdn_wu",
  )(k, v, gam, beta, m, seg)


def _grads_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, m_ref, seg_ref, h_ref, dh_ref, do_ref, *refs, bv, nblk,
                  stored_a):
  a_ref, refs = (refs[0], refs[1:]) if stored_a else (None, refs)
  dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref = refs

  def cols(j):
    return pl.ds(pl.multiple_of(j * bv, bv), bv) if nblk > 1 else slice(None)

  def load(j):
    s = cols(j)
    return (v_ref[:, s], h_ref[:, s].astype(jnp.float32), dh_ref[:, s].astype(jnp.float32), do_ref[:, s])

  def store_dv(j, dv):
    dv_ref[:, cols(j)] = dv.astype(dv_ref.dtype)

  out = cm.chunk_backward(q_ref[...], k_ref[...], gam_ref[...], beta_ref[...], m_ref[...], seg_ref[...],
                          load, store_dv, nblk, A=None if a_ref is None else a_ref[...])
  for ref, x in zip((dq_ref, dk_ref, dbeta_ref, dg_ref), out):
    ref[...] = x.astype(ref.dtype)


def grads_call(q, k, v, gam, beta, m, seg, h, dh, do, *, chunk_size, compiler_params, interpret, bv=None, a=None):
  """dq, dk [N,Tp,K], dv [N,Tp,V] (q.dtype), dbeta, dg [N,Tp,1] float32 (dg w.r.t. the per-token g). `a` [N,Tp,C]: stored A per chunk."""
  N, Tp, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  col = _row_spec(C, 1)
  sds = jax.ShapeDtypeStruct
  bv = V if bv is None else min(bv, V)
  kernel = functools.partial(_grads_kernel, bv=bv, nblk=V // bv, stored_a=a is not None)
  extra = [] if a is None else [a]
  return pl.pallas_call(
      kernel, grid=(N, Tp // C),
      in_specs=[_row_spec(C, K), _row_spec(C, K), _row_spec(C, V), col, col, col, col,
                _state_spec(K, V), _state_spec(K, V), _row_spec(C, V)] + [_row_spec(C, C)] * len(extra),
      out_specs=[_row_spec(C, K), _row_spec(C, K), _row_spec(C, V), col, col],
      out_shape=[sds((N, Tp, K), q.dtype), sds((N, Tp, K), q.dtype), sds((N, Tp, V), q.dtype),
                 sds((N, Tp, 1), jnp.float32), sds((N, Tp, 1), jnp.float32)],
      compiler_params=compiler_params, interpret=interpret, name="gdn_grads",
  )(q, k, v, gam, beta, m, seg, h, dh, do, *extra)
