"""Mosaic TPU backend: chunk-parallel kernels plus sequential state passes (grid axis over chunks, state in VMEM).

The sequential kernels walk the chunks on an "arbitrary" (in-order) grid axis and carry the [K, V] float32
state in a VMEM scratch buffer; q/k/w/u blocks of the next chunk are pipelined in by Pallas. Cumulative sums
are not lowered inside TPU kernels, so the within-chunk cumsum of g is computed by XLA before the call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _compat
from . import chunk_math as cm
from . import pallas_common

_PAR = lambda: _compat.tpu_params(("parallel", "parallel"))
_SEQ = lambda: _compat.tpu_params(("parallel", "arbitrary"))


def wu(k, v, gam, beta, m, seg, *, chunk_size):
  return pallas_common.wu_call(k, v, gam, beta, m, seg, chunk_size=chunk_size, compiler_params=_PAR(),
                               interpret=_compat.tpu_interpret())


def grads(q, k, v, gam, beta, m, seg, h, dh, do, *, chunk_size):
  return pallas_common.grads_call(q, k, v, gam, beta, m, seg, h, dh, do, chunk_size=chunk_size,
                                  compiler_params=_PAR(), interpret=_compat.tpu_interpret())


def _forward_kernel(q_ref, k_ref, w_ref, u_ref, gam_ref, m_ref, seg_ref, h0_ref, o_ref, hT_ref, *rest,
                    store):
  h_ref, s_ref = rest if store else (None, rest[0])
  c = pl.program_id(1)

  @pl.when(c == 0)
  def _():
    s_ref[...] = h0_ref[...]

  S = s_ref[...]
  if store:
    h_ref[...] = S.astype(h_ref.dtype)
  o, S1 = cm.chunk_forward(q_ref[...], k_ref[...], w_ref[...], u_ref[...], gam_ref[...], m_ref[...],
                           seg_ref[...], S)
  o_ref[...] = o.astype(o_ref.dtype)
  s_ref[...] = S1

  @pl.when(c == pl.num_programs(1) - 1)
  def _():
    hT_ref[...] = S1


def forward(q, k, w, u, gam, m, seg, h0, store, *, chunk_size):
  N, Tp, K = q.shape
  V = u.shape[-1]
  C = chunk_size
  NT = Tp // C
  row = lambda d: pl.BlockSpec((None, C, d), lambda n, c: (n, c, 0))
  st = pl.BlockSpec((None, K, V), lambda n, c: (n, 0, 0))
  out_specs = [row(V), st]
  out_shape = [jax.ShapeDtypeStruct((N, Tp, V), q.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
  if store:
    out_specs.append(pl.BlockSpec((None, None, K, V), lambda n, c: (n, c, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((N, NT, K, V), q.dtype))
  out = pl.pallas_call(
      functools.partial(_forward_kernel, store=store), grid=(N, NT),
      in_specs=[row(K), row(K), row(K), row(V), row(1), row(1), row(1), st],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
      compiler_params=_SEQ(), interpret=_compat.tpu_interpret(), name="gdn_fwd_state",
  )(q, k, w, u, gam, m, seg, h0)
  return out[0], out[1], (out[2] if store else None)


def _backward_state_kernel(q_ref, k_ref, w_ref, do_ref, gam_ref, m_ref, seg_ref, dhT_ref, dh_ref, dh0_ref,
                           s_ref):
  c = pl.program_id(1)  # walks the chunks last to first

  @pl.when(c == 0)
  def _():
    s_ref[...] = dhT_ref[...]

  dS = s_ref[...]
  dh_ref[...] = dS.astype(dh_ref.dtype)
  dS0 = cm.chunk_backward_state(q_ref[...], k_ref[...], w_ref[...], do_ref[...], gam_ref[...], m_ref[...],
                                seg_ref[...], dS)
  s_ref[...] = dS0

  @pl.when(c == pl.num_programs(1) - 1)
  def _():
    dh0_ref[...] = dS0


def backward_state(q, k, w, do, gam, m, seg, dhT, *, chunk_size):
  N, Tp, K = q.shape
  V = do.shape[-1]
  C = chunk_size
  NT = Tp // C
  row = lambda d: pl.BlockSpec((None, C, d), lambda n, c: (n, NT - 1 - c, 0))
  st = pl.BlockSpec((None, K, V), lambda n, c: (n, 0, 0))
  dh, dh0 = pl.pallas_call(
      _backward_state_kernel, grid=(N, NT),
      in_specs=[row(K), row(K), row(K), row(V), row(1), row(1), row(1), st],
      out_specs=[pl.BlockSpec((None, None, K, V), lambda n, c: (n, NT - 1 - c, 0, 0)), st],
      out_shape=[jax.ShapeDtypeStruct((N, NT, K, V), q.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
      compiler_params=_SEQ(), interpret=_compat.tpu_interpret(), name="gdn_bwd_state",
  )(q, k, w, do, gam, m, seg, dhT)
  return dh, dh0
