"""GPU backend through the Pallas Triton lowering (sm80+).

Triton programs of one launch run concurrently, so the sequential passes cannot use a grid axis over chunks:
each program owns one head and one slice of BV value columns, loops over the chunks with `lax.fori_loop` and
keeps its [K, BV] float32 state in registers (V' and O are column-separable given W and U, so the value
columns split into independent programs). The chunk-parallel stages share their bodies with the TPU backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat
from . import chunk_math as cm
from . import pallas_common
from .naive import L2NORM_EPS

# Value columns per program of the sequential passes. 32 (twice the programs of 64 on the H100's 132 SMs): 3-9%
# faster end to end at T=8192-32768 in the same device call (gdn_kernel_notes.md, run 6).
BV = 32
# Triton num_warps / num_stages of the sequential passes (versions 2 and 3). The stages set how far ahead of the
# dependent state step the per-chunk operands are loaded: 3 made the forward pass 25% faster than 2 (run 8).
SERIAL_WARPS, SERIAL_STAGES = 4, 3
# Version 2 (default): `prep` hoists all state-independent work (the inverse, Q K^T * D, gate columns) into one
# chunk-parallel kernel, the serial passes read it, and the gradient kernel reuses the stored A. False selects
# version 1 (wu + forward/backward_state that recompute the gates and Q K^T per step, inverse recomputed in grads).
FUSED_PREP = True


def wu(k, v, gam, beta, m, seg, *, chunk_size):
  return pallas_common.wu_call(k, v, gam, beta, m, seg, chunk_size=chunk_size,
                               compiler_params=_compat.triton_params(num_warps=8, num_stages=2),
                               interpret=_compat.gpu_interpret())


def grads(q, k, v, gam, beta, m, seg, h, dh, do, *, chunk_size, a=None):
  return pallas_common.grads_call(q, k, v, gam, beta, m, seg, h, dh, do, chunk_size=chunk_size,
                                  compiler_params=_compat.triton_params(num_warps=8, num_stages=1),
                                  interpret=_compat.gpu_interpret(), bv=BV, a=a)


# ---------------------------------------------------------------- version 2: state-independent work hoisted

PREP_NAMES = ("w", "u", "a", "p", "qe", "kf", "gl")
PREP_WARPS = 4  # num_warps of the chunk-parallel prep kernels (2 and 8: 2.1x and 1.5x slower, run 8)
# Products of prep's float32 triangular inverse when the compute dtype is 16-bit: "ieee" (float32 on the FMA units),
# "tf32" (one TF32 pass on the matrix units, ~11 bits, above the compute dtype's 8) or "tf32x3" (three TF32 passes,
# ~float32; interpret mode runs these as "ieee": the CPU has no such algorithm). float32 operands always use "ieee".
# "tf32" is the default: the forward 2.50 -> 2.26 ms at T=32768 on an H100 (run 10) with errors against the float32
# recurrence unchanged to 1%; "tf32x3" was slower than "ieee" (registers).
INVERSE_PRECISION = "tf32"
# How prep inverts the four [16 x 16] diagonal tiles of (I + L): "substitution" (15 dependent products each) or
# "doubling" (`chunk_math.unit_lower_inverse_doubling`: 6 dependent products each).
DIAG_INVERSE = "doubling"
# PREP_DENSE: prep on whole [64 x 64] matrices (`chunk_math.chunk_prep_dense`: the inverse by doubling over the chunk,
# 14 products) instead of [16 x 16] tiles (~70 smaller products; `DIAG_INVERSE` applies to those). Prep 0.264 ->
# 0.220 ms at T=8192, forward -4% at T=32768 on an H200 (run 19); at 8 warps 25% slower (run 20).
PREP_DENSE = True


def _inverse_precision(dtype):
  if dtype == jnp.float32 or INVERSE_PRECISION == "ieee":
    return None
  if INVERSE_PRECISION == "tf32":
    return jax.lax.Precision.HIGH
  if INVERSE_PRECISION == "tf32x3":
    return None if _compat.gpu_interpret() else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  raise ValueError(f"INVERSE_PRECISION must be 'ieee', 'tf32' or 'tf32x3', got {INVERSE_PRECISION!r}")


def _run_chunk_prep(out_refs, n_rows, load_rows, dtype):
  """`chunk_math.chunk_prep` over one chunk: `load_rows(name, rows)` reads rows of an input; the results go to the
  `PREP_NAMES` output refs (`a` whole or as [SUB x SUB] tiles, the rest as row blocks)."""
  outs = dict(zip(PREP_NAMES, out_refs))
  S = cm.SUB
  rows = lambda b: slice(None) if b is None else pl.ds(b * S, S)

  def store(name, b, x):
    ref = outs[name]
    if name == "a" and b is not None:
      ref[pl.ds(b[0] * S, S), pl.ds(b[1] * S, S)] = x.astype(ref.dtype)
    else:
      ref[rows(b), :] = x.astype(ref.dtype)

  load = lambda name, b: load_rows(name, rows(b))
  if PREP_DENSE:
    cm.chunk_prep_dense(load, store, n_rows, _inverse_precision(dtype))
  else:
    cm.chunk_prep(load, store, n_rows, _inverse_precision(dtype), DIAG_INVERSE)


def _prep_kernel(q_ref, k_ref, v_ref, gam_ref, beta_ref, m_ref, seg_ref, *out_refs):
  ins = dict(q=q_ref, k=k_ref, v=v_ref, gam=gam_ref, beta=beta_ref, m=m_ref, seg=seg_ref)
  _run_chunk_prep(out_refs, q_ref.shape[0], lambda name, r: ins[name][r, :], k_ref.dtype)


def prep(q, k, v, gam, beta, m, seg, *, chunk_size):
  """Chunk-parallel: dict of w, u [N,Tp,K|V], a, p [N,Tp,C], qe, kf [N,Tp,K] (q.dtype), gl [N,Tp,1] float32."""
  N, Tp, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  row = lambda d: pl.BlockSpec((None, C, d), lambda n, c: (n, c, 0))
  dims = dict(w=K, u=V, a=C, p=C, qe=K, kf=K, gl=1)
  sds = lambda n: jax.ShapeDtypeStruct((N, Tp, dims[n]), jnp.float32 if n == "gl" else q.dtype)
  out = pl.pallas_call(
      _prep_kernel, grid=(N, Tp // C),
      in_specs=[row(K), row(K), row(V), row(1), row(1), row(1), row(1)],
      out_specs=[row(dims[n]) for n in PREP_NAMES], out_shape=[sds(n) for n in PREP_NAMES],
      compiler_params=_compat.triton_params(num_warps=PREP_WARPS, num_stages=2), interpret=_compat.gpu_interpret(),
      name="gdn_prep",
  )(q, k, v, gam, beta, m, seg)
  return dict(zip(PREP_NAMES, out))


def _forward_pre_kernel(qe_ref, kf_ref, w_ref, u_ref, p_ref, gl_ref, h0_ref, *outs, C, NT, need_o, store):
  outs = list(outs)
  o_ref = outs.pop(0) if need_o else None
  hT_ref = outs.pop(0)
  h_ref = outs.pop(0) if store else None

  def body(c, S):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    if h_ref is not None:
      h_ref[c] = S.astype(h_ref.dtype)
    o, S1 = cm.chunk_forward_pre(qe_ref[sl, :], kf_ref[sl, :], w_ref[sl, :], u_ref[sl, :], p_ref[sl, :],
                                 gl_ref[sl, :], S, need_o)
    if need_o:
      o_ref[sl, :] = o.astype(o_ref.dtype)
    return S1

  hT_ref[...] = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))


def forward_pre(pre, h0, store, need_o=True, *, chunk_size):
  """Sequential state pass over `prep`'s outputs: (o [N,Tp,V] | None, hT [N,K,V] f32, h [N,NT,K,V] | None)."""
  qe, kf, w, u, p, gl = (pre[n] for n in ("qe", "kf", "w", "u", "p", "gl"))
  N, Tp, K = qe.shape
  V = u.shape[-1]
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  full = lambda d: pl.BlockSpec((None, Tp, d), lambda n, j: (n, 0, 0))
  cols = pl.BlockSpec((None, Tp, bv), lambda n, j: (n, 0, j))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  out_specs = [st]
  out_shape = [jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
  if need_o:
    out_specs.insert(0, cols)
    out_shape.insert(0, jax.ShapeDtypeStruct((N, Tp, V), qe.dtype))
  if store:
    out_specs.append(pl.BlockSpec((None, NT, K, bv), lambda n, j: (n, 0, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((N, NT, K, V), qe.dtype))
  out = list(pl.pallas_call(
      functools.partial(_forward_pre_kernel, C=C, NT=NT, need_o=need_o, store=store), grid=(N, V // bv),
      in_specs=[full(K), full(K), full(K), cols, full(C), full(1), st],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compat.triton_params(num_warps=SERIAL_WARPS, num_stages=SERIAL_STAGES),
      interpret=_compat.gpu_interpret(), name="gdn_fwd_state_v2",
  )(qe, kf, w, u, p, gl, h0))
  o = out.pop(0) if need_o else None
  hT = out.pop(0)
  return o, hT, (out.pop(0) if store else None)


def _backward_state_pre_kernel(qe_ref, kf_ref, w_ref, p_ref, gl_ref, do_ref, dhT_ref, dh_ref, dh0_ref, *, C, NT):
  def body(i, dS):
    c = NT - 1 - i
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    dh_ref[c] = dS.astype(dh_ref.dtype)
    return cm.chunk_backward_state_pre(qe_ref[sl, :], kf_ref[sl, :], w_ref[sl, :], p_ref[sl, :], gl_ref[sl, :],
                                       do_ref[sl, :], dS)

  dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dhT_ref[...].astype(jnp.float32))


def backward_state_pre(pre, do, dhT, *, chunk_size):
  qe, kf, w, p, gl = (pre[n] for n in ("qe", "kf", "w", "p", "gl"))
  N, Tp, K = qe.shape
  V = do.shape[-1]
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  full = lambda d: pl.BlockSpec((None, Tp, d), lambda n, j: (n, 0, 0))
  cols = pl.BlockSpec((None, Tp, bv), lambda n, j: (n, 0, j))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  return pl.pallas_call(
      functools.partial(_backward_state_pre_kernel, C=C, NT=NT), grid=(N, V // bv),
      in_specs=[full(K), full(K), full(K), full(C), full(1), cols, st],
      out_specs=[pl.BlockSpec((None, NT, K, bv), lambda n, j: (n, 0, 0, j)), st],
      out_shape=[jax.ShapeDtypeStruct((N, NT, K, V), qe.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)],
      compiler_params=_compat.triton_params(num_warps=SERIAL_WARPS, num_stages=SERIAL_STAGES),
      interpret=_compat.gpu_interpret(), name="gdn_bwd_state_v2",
  )(qe, kf, w, p, gl, do, dhT)


def _forward_kernel(q_ref, k_ref, w_ref, u_ref, gam_ref, m_ref, seg_ref, h0_ref, o_ref, hT_ref, *rest, C, NT):
  h_ref = rest[0] if rest else None

  def body(c, S):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    if h_ref is not None:
      h_ref[c] = S.astype(h_ref.dtype)
    o, S1 = cm.chunk_forward(q_ref[sl, :], k_ref[sl, :], w_ref[sl, :], u_ref[sl, :], gam_ref[sl, :],
                             m_ref[sl, :], seg_ref[sl, :], S)
    o_ref[sl, :] = o.astype(o_ref.dtype)
    return S1

  hT_ref[...] = jax.lax.fori_loop(0, NT, body, h0_ref[...].astype(jnp.float32))


def forward(q, k, w, u, gam, m, seg, h0, store, *, chunk_size):
  N, Tp, K = q.shape
  V = u.shape[-1]
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  full = lambda d: pl.BlockSpec((None, Tp, d), lambda n, j: (n, 0, 0))
  cols = pl.BlockSpec((None, Tp, bv), lambda n, j: (n, 0, j))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  out_specs = [cols, st]
  out_shape = [jax.ShapeDtypeStruct((N, Tp, V), q.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)]
  if store:
    out_specs.append(pl.BlockSpec((None, NT, K, bv), lambda n, j: (n, 0, 0, j)))
    out_shape.append(jax.ShapeDtypeStruct((N, NT, K, V), q.dtype))
  out = pl.pallas_call(
      functools.partial(_forward_kernel, C=C, NT=NT), grid=(N, V // bv),
      in_specs=[full(K), full(K), full(K), cols, full(1), full(1), full(1), st],
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compat.triton_params(num_warps=4, num_stages=2), interpret=_compat.gpu_interpret(),
      name="gdn_fwd_state",
  )(q, k, w, u, gam, m, seg, h0)
  return out[0], out[1], (out[2] if store else None)


def _backward_state_kernel(q_ref, k_ref, w_ref, do_ref, gam_ref, m_ref, seg_ref, dhT_ref, dh_ref, dh0_ref, *,
                           C, NT):
  def body(i, dS):
    c = NT - 1 - i
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    dh_ref[c] = dS.astype(dh_ref.dtype)
    return cm.chunk_backward_state(q_ref[sl, :], k_ref[sl, :], w_ref[sl, :], do_ref[sl, :], gam_ref[sl, :],
                                   m_ref[sl, :], seg_ref[sl, :], dS)

  dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dhT_ref[...].astype(jnp.float32))


def backward_state(q, k, w, do, gam, m, seg, dhT, *, chunk_size):
  N, Tp, K = q.shape
  V = do.shape[-1]
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  full = lambda d: pl.BlockSpec((None, Tp, d), lambda n, j: (n, 0, 0))
  cols = pl.BlockSpec((None, Tp, bv), lambda n, j: (n, 0, j))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  return pl.pallas_call(
      functools.partial(_backward_state_kernel, C=C, NT=NT), grid=(N, V // bv),
      in_specs=[full(K), full(K), full(K), cols, full(1), full(1), full(1), st],
      out_specs=[pl.BlockSpec((None, NT, K, bv), lambda n, j: (n, 0, 0, j)), st],
      out_shape=[jax.ShapeDtypeStruct((N, NT, K, V), q.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)],
      compiler_params=_compat.triton_params(num_warps=4, num_stages=2), interpret=_compat.gpu_interpret(),
      name="gdn_bwd_state",
  )(q, k, w, do, gam, m, seg, dhT)


# ---------------------------------------------------------------- version 3: split gradient kernel
# Version 3 (SPLIT_GRADS, the default): the backward's states-only pass also stores V' and the reverse pass stores
# dV' (both already formed there), and one chunk-parallel gradient kernel reads them with the states (no
# recomputation of U, V', dV'; dL = -strict(dxu V'^T)), in passes over [GRAD_BV] value columns that carry at most
# three [64 x GRAD_BK] float32 sums. False selects version 2's backward (gradient kernel with a loop over value
# blocks carrying three [C, K] and two [C, C] accumulators). The forward is version 2's either way.
# Register use, read off ptxas -v for sm_90a (standalone Triton 3.9 on the lowered Triton IR, T=256, K=128, V=256):
# version 2's gradient kernel: 255 registers, 3960 B spilled, 451 spill instructions inside its loop body; this one
# (defaults below): 255 registers, ~840 B spilled, 0-2 spill instructions per loop body (the rest, ~380, in the
# straight-line [C, C] work that runs once per program). Unrolled value blocks (GRAD_LOOP = False) spill ~1800 B,
# GRAD_BV = 128 spills inside the loops, 4 warps spill ~3800 B.
#
# The version-3 wrappers take per-token tensors in the caller's [B, T, H, *] layout (heads-first arrays pass as
# [N, Tp, 1, *], i.e. H = 1) and keep the intermediates of `prep` and the states heads-first ([B*H, ...]).
SPLIT_GRADS = True
# NATIVE_LAYOUT (with SPLIT_GRADS, the default): q, k, v, O and all input gradients are read and written in the
# caller's [B, T, H, *] layout (`forward_native`, `backward_native`); prep's outputs and the states stay heads-first.
# False: `chunk._prepare` transposes q, k, v to heads-first in XLA and O back (measured on an H100, run 9: forward
# 2.76 -> 2.48 ms and forward+backward 7.58 -> 7.01 ms at T=32768 without the transposes).
NATIVE_LAYOUT = True
# KERNEL_L2NORM (with NATIVE_LAYOUT): the q/k L2 norm and the scale run inside the kernels (True), or in XLA as one
# elementwise pass in the caller's layout before them (False, the default: the in-kernel norm doubled prep's time,
# 0.63 vs 0.33 ms at T=8192, run 8; prep on normalised rows in this layout costs the same as on heads-first rows).
KERNEL_L2NORM = False
# QK_NORM_KERNEL (with NATIVE_LAYOUT and KERNEL_L2NORM off): that elementwise pass is one Triton kernel for q and k
# (`qk_norm.py`; its VJP stays XLA's) instead of XLA's fusions.
QK_NORM_KERNEL = True
# KERNEL_GATES (native path): prep forms the within-chunk cumulative sum of g itself, beta is read in its own dtype,
# and without segment ids the kernels use m = 1, seg = 0 instead of reading arrays, so the forward launches no XLA
# kernels on the gates. False: XLA forms gam, m, seg and a float32 beta (run 12's path).
KERNEL_GATES = True
# With KERNEL_GATES, what the gradient kernel reads (it has no registers to spare): "xla_gam" (XLA's within-chunk
# cumsum of g; m = 1, seg = 0 without resets), "kernel" (sums g itself: 13% slower, run 14) or "xla" (XLA's cumsum,
# and m, seg arrays even without resets).
GRAD_GATES = "xla_gam"
# KERNEL_ZERO_STATE (with KERNEL_GATES): without an initial state the serial passes start from a zero constant rather
# than reading a zeroed array (the forward state pass alone: 0.294 against 0.261 ms at T=8192, run 14).
KERNEL_ZERO_STATE = False
GRAD_BK = 64  # key columns per block of the version-3 gradient kernel
GRAD_BV = 64  # value columns per block of the version-3 gradient kernel
GRAD_LOOP = True  # value blocks of the gradient kernel in a fori_loop (True) or unrolled
GRAD_WARPS = 8  # num_warps of the version-3 gradient kernel
GRAD_STAGES = 1  # num_stages of the version-3 gradient kernel


def _forward_v3_kernel(qe_ref, kf_ref, w_ref, u_ref, p_ref, gl_ref, *refs, C, NT, need_o, store, has_h0):
  h0_ref = refs[0] if has_h0 else None
  outs = list(refs[1:] if has_h0 else refs)
  o_ref = outs.pop(0) if need_o else None
  hT_ref = outs.pop(0)
  h_ref, vn_ref = outs if store else (None, None)

  def body(c, S):
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    if store:
      h_ref[c] = S.astype(h_ref.dtype)
    o, S1, vn = cm.chunk_forward_pre(qe_ref[sl, :] if need_o else None, kf_ref[sl, :], w_ref[sl, :], u_ref[sl, :],
                                     p_ref[sl, :] if need_o else None, gl_ref[sl, :], S, need_o, return_vn=True)
    if need_o:
      o_ref[sl, :] = o.astype(o_ref.dtype)
    if store:
      vn_ref[sl, :] = vn.astype(vn_ref.dtype)
    return S1

  S0 = h0_ref[...].astype(jnp.float32) if has_h0 else jnp.zeros(hT_ref.shape, jnp.float32)
  hT_ref[...] = jax.lax.fori_loop(0, NT, body, S0)


def _serial_specs(H, Tp, K, bv):
  """BlockSpecs of the serial passes (grid: batch, head, value block) over heads-first [B*H, ...] arrays: whole rows
  of width d, one value block of a per-token array, one value block of a [K, V] state."""
  nh = lambda b, hh: b * H + hh
  full = lambda d: pl.BlockSpec((None, Tp, d), lambda b, hh, j: (nh(b, hh), 0, 0))
  cols = pl.BlockSpec((None, Tp, bv), lambda b, hh, j: (nh(b, hh), 0, j))
  st = pl.BlockSpec((None, K, bv), lambda b, hh, j: (nh(b, hh), 0, j))
  return nh, full, cols, st


def forward_v3(pre, h0, *, heads, chunk_size, need_o=True, store=False, o_dtype=None):
  """Sequential state pass over `prep`'s outputs ([B*H, Tp, *]): (o [B, Tp, H, V] | None, hT [B*H, K, V] f32,
  h [B*H, NT, K, V] | None, V' [B*H, Tp, V] | None); `store` writes the states and V' (compute dtype).
  h0 [B*H, K, V] float32, or None for a zero initial state."""
  qe, kf, w, u, p, gl = (pre[n] for n in ("qe", "kf", "w", "u", "p", "gl"))
  N, Tp, K = w.shape
  V = u.shape[-1]
  H = heads
  B = N // H
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  nh, full, cols, st = _serial_specs(H, Tp, K, bv)
  sds = jax.ShapeDtypeStruct
  out_specs, out_shape = [st], [sds((N, K, V), jnp.float32)]
  if need_o:
    out_specs.insert(0, pl.BlockSpec((None, Tp, None, bv), lambda b, hh, j: (b, 0, hh, j)))
    out_shape.insert(0, sds((B, Tp, H, V), o_dtype or w.dtype))
  if store:
    out_specs += [pl.BlockSpec((None, NT, K, bv), lambda b, hh, j: (nh(b, hh), 0, 0, j)), cols]
    out_shape += [sds((N, NT, K, V), w.dtype), sds((N, Tp, V), w.dtype)]
  has_h0 = h0 is not None
  out = list(pl.pallas_call(
      functools.partial(_forward_v3_kernel, C=C, NT=NT, need_o=need_o, store=store, has_h0=has_h0),
      grid=(B, H, V // bv), in_specs=[full(K), full(K), full(K), cols, full(C), full(1)] + [st] * has_h0,
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compat.triton_params(num_warps=SERIAL_WARPS, num_stages=SERIAL_STAGES),
      interpret=_compat.gpu_interpret(), name="gdn_fwd_state_v3",
  )(qe, kf, w, u, p, gl, *([h0] if has_h0 else [])))
  o = out.pop(0) if need_o else None
  hT = out.pop(0)
  h, vn = out if store else (None, None)
  return o, hT, h, vn


def _backward_state_v3_kernel(qe_ref, kf_ref, w_ref, p_ref, gl_ref, do_ref, dhT_ref, dh_ref, dh0_ref, dvn_ref, *,
                              C, NT):
  cdt = w_ref.dtype

  def body(i, dS):
    c = NT - 1 - i
    sl = pl.ds(pl.multiple_of(c * C, C), C)
    dh_ref[c] = dS.astype(dh_ref.dtype)
    dS0, dvn = cm.chunk_backward_state_pre(qe_ref[sl, :], kf_ref[sl, :], w_ref[sl, :], p_ref[sl, :], gl_ref[sl, :],
                                           do_ref[sl, :].astype(cdt), dS, return_dvn=True)
    dvn_ref[sl, :] = dvn.astype(dvn_ref.dtype)
    return dS0

  dh0_ref[...] = jax.lax.fori_loop(0, NT, body, dhT_ref[...].astype(jnp.float32))


def backward_state_v3(pre, do, dhT, *, chunk_size):
  """Reverse state pass; do [B, Tp, H, V] (any float dtype). Returns dh [B*H, NT, K, V], dh0 [B*H, K, V] f32 and
  dV' [B*H, Tp, V] (compute dtype)."""
  qe, kf, w, p, gl = (pre[n] for n in ("qe", "kf", "w", "p", "gl"))
  N, Tp, K = w.shape
  B, _, H, V = do.shape
  C = chunk_size
  NT = Tp // C
  bv = min(BV, V)
  nh, full, cols, st = _serial_specs(H, Tp, K, bv)
  sds = jax.ShapeDtypeStruct
  return pl.pallas_call(
      functools.partial(_backward_state_v3_kernel, C=C, NT=NT), grid=(B, H, V // bv),
      in_specs=[full(K), full(K), full(K), full(C), full(1),
                pl.BlockSpec((None, Tp, None, bv), lambda b, hh, j: (b, 0, hh, j)), st],
      out_specs=[pl.BlockSpec((None, NT, K, bv), lambda b, hh, j: (nh(b, hh), 0, 0, j)), st, cols],
      out_shape=[sds((N, NT, K, V), w.dtype), sds((N, K, V), jnp.float32), sds((N, Tp, V), w.dtype)],
      compiler_params=_compat.triton_params(num_warps=SERIAL_WARPS, num_stages=SERIAL_STAGES),
      interpret=_compat.gpu_interpret(), name="gdn_bwd_state_v3",
  )(qe, kf, w, p, gl, do, dhT)


def _norm_factor(ref, blocks, l2norm):
  """Per-row rsqrt(sum x^2 + eps) [C, 1] of a raw q/k block (summed over its key-column blocks), or None."""
  if not l2norm:
    return None
  ss = None
  for b in blocks:
    x = ref[:, b].astype(jnp.float32)
    t = jnp.sum(x * x, axis=1, keepdims=True)
    ss = t if ss is None else ss + t
  return jax.lax.rsqrt(ss + L2NORM_EPS)


def _normalise(x, rho, scale):
  """x (raw rows, float32) -> rows as `chunk._prepare` makes them: (x * rho) * scale (q) or x * rho (k)."""
  if rho is not None:
    x = x * rho
  return x if scale is None else x * scale


def _gate_loader(g_ref, m_ref, seg_ref, cumsum):
  """load(name, rows) of one chunk's float32 [rows, 1] gate columns "gam", "m" and "seg" (rows: slice(None) or a
  `pl.ds`): gam read as stored, or with `cumsum` summed here from the per-token g; m = 1 and seg = 0 where the
  refs are None (no segment ids)."""
  C = g_ref.shape[0]
  grow = cm.col_to_row(g_ref[...].astype(jnp.float32)) if cumsum else None

  def load(name, r):
    n = C if isinstance(r, slice) else r.size
    if name == "gam":
      return cm.prefix_rows(grow, 0 if isinstance(r, slice) else r.start, n) if cumsum else g_ref[r, :]
    ref = m_ref if name == "m" else seg_ref
    return jnp.full((n, 1), 1.0 if name == "m" else 0.0, jnp.float32) if ref is None else ref[r, :]
  return load


def _grads_v3_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, beta_ref, *refs, bk, bv, raw, scale, l2norm, cumsum,
                     has_seg):
  m_ref, seg_ref = refs[:2] if has_seg else (None, None)
  a_ref, vn_ref, dvn_ref, h_ref, dh_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref = refs[2:] if has_seg else refs
  gate = _gate_loader(g_ref, m_ref, seg_ref, cumsum)
  cdt = a_ref.dtype
  f32 = jnp.float32
  nk, nv = q_ref.shape[-1] // bk, v_ref.shape[-1] // bv
  kc = lambda i: slice(i * bk, (i + 1) * bk)
  vc = lambda j: (slice(j * bv, (j + 1) * bv) if isinstance(j, int) else pl.ds(pl.multiple_of(j * bv, bv), bv))
  rows = dict(v=v_ref, do=do_ref, vn=vn_ref, dvn=dvn_ref)
  states = dict(h=h_ref, dh=dh_ref)
  # raw: q, k arrive as given by the caller; normalise them here and apply the norm's VJP to dq', dk'.
  rq = _norm_factor(q_ref, [kc(i) for i in range(nk)], l2norm) if raw else None
  rk = _norm_factor(k_ref, [kc(i) for i in range(nk)], l2norm) if raw else None

  def load(name, j):
    return rows[name][:, vc(j)].astype(cdt)

  def load_state(name, kb, j):
    return states[name][kc(kb), vc(j)].astype(cdt)

  def load_qk(kb):
    q, k = q_ref[:, kc(kb)], k_ref[:, kc(kb)]
    if raw:
      q, k = _normalise(q.astype(f32), rq, scale), _normalise(k.astype(f32), rk, None)
    return q.astype(cdt), k.astype(cdt)

  def store_dv(j, x):
    dv_ref[:, vc(j)] = x.astype(dv_ref.dtype)

  held = []  # raw + l2norm: (dq', dk') per key block until the row sums q . dq', k . dk' are complete
  tq = tk = None

  def store_dqk(kb, dq, dk):
    nonlocal tq, tk
    if raw and l2norm:
      if kb < nk - 1:  # waits in registers in the compute dtype (as the old path's custom VJP returned dq', dk')
        dq, dk = dq.astype(cdt), dk.astype(cdt)
      t = (jnp.sum(q_ref[:, kc(kb)].astype(f32) * dq.astype(f32), axis=1, keepdims=True),
           jnp.sum(k_ref[:, kc(kb)].astype(f32) * dk.astype(f32), axis=1, keepdims=True))
      tq, tk = t if kb == 0 else (tq + t[0], tk + t[1])
      held.append((dq, dk))
      return
    if raw:
      dq = dq * scale
    dq_ref[:, kc(kb)] = dq.astype(dq_ref.dtype)
    dk_ref[:, kc(kb)] = dk.astype(dk_ref.dtype)

  whole = slice(None)
  dbeta, dg = cm.chunk_backward_split(a_ref[...], gate("gam", whole), beta_ref[...].astype(f32), gate("m", whole),
                                      gate("seg", whole), load, load_state, load_qk, store_dv, store_dqk,
                                      nk, nv, bk, loop=GRAD_LOOP)
  dbeta_ref[...] = dbeta
  dg_ref[...] = dg
  # x' = s rho x: dx = s rho (dx' - rho^2 x (x . dx'))
  for kb, (dq, dk) in enumerate(held):
    q, k = q_ref[:, kc(kb)].astype(f32), k_ref[:, kc(kb)].astype(f32)
    dq_ref[:, kc(kb)] = (scale * rq * (dq.astype(f32) - (rq * rq * tq) * q)).astype(dq_ref.dtype)
    dk_ref[:, kc(kb)] = (rk * (dk.astype(f32) - (rk * rk * tk) * k)).astype(dk_ref.dtype)


def grads_v3(a, q, k, v, gam, beta, m, seg, h, dh, vn, dvn, do, *, chunk_size, raw=False, scale=None, l2norm=True,
             cumsum=False):
  """Chunk-parallel gradient kernel of version 3, grid (B, H, chunks).

  Per-token inputs in the [B, Tp, H, *] layout: q, k, v, do, gam, beta ([..., 1]); m, seg [B, Tp, 1] float32 or
  both None (no resets). gam is the within-chunk cumulative log-decay, or with `cumsum` the per-token g.
  q and k are normalised and scaled already, or with `raw` as the caller gave them (normalised with `l2norm`, q
  scaled by `scale`, and the gradients taken through that here). From the other stages ([B*H, ...]): a (`prep`),
  h and V' (states-only pass), dh and dV' (reverse pass). Returns dq, dk [B, Tp, H, K] (q.dtype), dv [B, Tp, H, V]
  (v.dtype) and dbeta, dg [B, Tp, H, 1] float32 (dg w.r.t. the per-token g).
  """
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  bk, bv = min(GRAD_BK, K), min(GRAD_BV, V)
  nh = lambda b, hh: b * H + hh
  tok = lambda d: pl.BlockSpec((None, C, None, d), lambda b, hh, c: (b, c, hh, 0))
  inter = lambda d: pl.BlockSpec((None, C, d), lambda b, hh, c: (nh(b, hh), c, 0))
  bcol = pl.BlockSpec((None, C, 1), lambda b, hh, c: (b, c, 0))
  st = pl.BlockSpec((None, None, K, V), lambda b, hh, c: (nh(b, hh), c, 0, 0))
  sds = jax.ShapeDtypeStruct
  f32 = jnp.float32
  has_seg = m is not None
  return pl.pallas_call(
      functools.partial(_grads_v3_kernel, bk=bk, bv=bv, raw=raw, scale=scale, l2norm=l2norm, cumsum=cumsum,
                        has_seg=has_seg), grid=(B, H, Tp // C),
      in_specs=[tok(K), tok(K), tok(V), tok(V), tok(1), tok(1)] + [bcol, bcol] * has_seg
      + [inter(C), inter(V), inter(V), st, st],
      out_specs=[tok(K), tok(K), tok(V), tok(1), tok(1)],
      out_shape=[sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(v.shape, v.dtype), sds((B, Tp, H, 1), f32),
                 sds((B, Tp, H, 1), f32)],
      compiler_params=_compat.triton_params(num_warps=GRAD_WARPS, num_stages=GRAD_STAGES),
      interpret=_compat.gpu_interpret(),
      name="gdn_grads_v3",
  )(q, k, v, do, gam, beta, *((m, seg) if has_seg else ()), a, vn, dvn, h, dh)


def backward_split(q, k, v, gam, beta, m, seg, h0, do, dhT, *, chunk_size):
  """Version-3 backward on `chunk._prepare`'s heads-first arrays ([N, Tp, *], q and k normalised and scaled):
  prep, states-only pass (+ V'), reverse pass (+ dV'), gradient kernel. Returns dq, dk, dv, dbeta, dg, dh0."""
  C = chunk_size
  pre = prep(q, k, v, gam, beta, m, seg, chunk_size=C)
  _, _, h, vn = forward_v3(pre, h0, heads=1, need_o=False, store=True, chunk_size=C)
  as4 = lambda x: x[:, :, None, :]  # [N, Tp, d] -> [N, Tp, 1, d]: the [B, T, H, *] layout with B = N, H = 1
  dh, dh0, dvn = backward_state_v3(pre, as4(do), dhT, chunk_size=C)
  out = grads_v3(pre["a"], as4(q), as4(k), as4(v), as4(gam), as4(beta), m, seg, h, dh, vn, dvn, as4(do),
                 chunk_size=C)
  return tuple(x[:, :, 0, :] for x in out) + (dh0,)


def _prep_v3_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, *refs, scale, l2norm, cumsum, has_seg):
  m_ref, seg_ref = refs[:2] if has_seg else (None, None)
  out_refs = refs[2:] if has_seg else refs
  ins = dict(q=q_ref, k=k_ref, v=v_ref, beta=beta_ref)
  gate = _gate_loader(g_ref, m_ref, seg_ref, cumsum)
  cdt = out_refs[PREP_NAMES.index("w")].dtype

  def load(name, r):
    if name in ("gam", "m", "seg"):
      return gate(name, r)
    x = ins[name][r, :]
    if name in ("q", "k"):  # raw rows -> normalised (and, for q, scaled) in the compute dtype
      if not l2norm and (scale is None or name == "k"):
        return x.astype(cdt)
      x = x.astype(jnp.float32)
      rho = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS) if l2norm else None
      return _normalise(x, rho, scale if name == "q" else None).astype(cdt)
    return x.astype(cdt if name == "v" else jnp.float32)

  _run_chunk_prep(out_refs, q_ref.shape[0], load, cdt)


def prep_v3(q, k, v, gam, beta, m, seg, *, chunk_size, scale, l2norm, cumsum=False):
  """`prep` on the caller's layout: q, k [B, Tp, H, K] and v [B, Tp, H, V] raw (any float dtype; the compute dtype
  is q's), gam (float32) and beta (any float dtype) [B, Tp, H, 1], m, seg [B, Tp, 1] float32 or both None (no
  resets); q/k rows are L2-normalised (`l2norm`) and q scaled here. gam is the within-chunk cumulative log-decay,
  or with `cumsum` the per-token g. Returns the dict of `prep` ([B*H, Tp, *])."""
  B, Tp, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  N = B * H
  tok = lambda d: pl.BlockSpec((None, C, None, d), lambda b, hh, c: (b, c, hh, 0))
  bcol = pl.BlockSpec((None, C, 1), lambda b, hh, c: (b, c, 0))
  dims = dict(w=K, u=V, a=C, p=C, qe=K, kf=K, gl=1)
  out_spec = lambda d: pl.BlockSpec((None, C, d), lambda b, hh, c: (b * H + hh, c, 0))
  sds = lambda n: jax.ShapeDtypeStruct((N, Tp, dims[n]), jnp.float32 if n == "gl" else q.dtype)
  has_seg = m is not None
  out = pl.pallas_call(
      functools.partial(_prep_v3_kernel, scale=scale, l2norm=l2norm, cumsum=cumsum, has_seg=has_seg),
      grid=(B, H, Tp // C), in_specs=[tok(K), tok(K), tok(V), tok(1), tok(1)] + [bcol, bcol] * has_seg,
      out_specs=[out_spec(dims[n]) for n in PREP_NAMES], out_shape=[sds(n) for n in PREP_NAMES],
      compiler_params=_compat.triton_params(num_warps=PREP_WARPS, num_stages=2), interpret=_compat.gpu_interpret(),
      name="gdn_prep_v3",
  )(q, k, v, gam, beta, *((m, seg) if has_seg else ()))
  return dict(zip(PREP_NAMES, out))


def forward_native(q, k, v, gam, beta, m, seg, h0, *, chunk_size, scale, l2norm, cumsum=False):
  """Forward on the caller's layout (see `prep_v3`; h0 [B*H, K, V] float32 or None): o [B, Tp, H, V] (v.dtype),
  hT."""
  pre = prep_v3(q, k, v, gam, beta, m, seg, chunk_size=chunk_size, scale=scale, l2norm=l2norm, cumsum=cumsum)
  o, hT, _, _ = forward_v3(pre, h0, heads=q.shape[2], need_o=True, o_dtype=v.dtype, chunk_size=chunk_size)
  return o, hT


def backward_native(q, k, v, gam, beta, m, seg, h0, do, dhT, *, chunk_size, scale, l2norm, cumsum=False):
  """Backward of `forward_native` (do [B, Tp, H, V], dhT [B*H, K, V]): dq, dk, dv in the caller's layout and
  dtypes (through the L2 norm and the scale), dbeta, dg [B, Tp, H, 1] float32, dh0 [B*H, K, V]. q and k as given
  to `forward_native`: raw when `l2norm` or `scale` is set, else already normalised and scaled."""
  C = chunk_size
  pre = prep_v3(q, k, v, gam, beta, m, seg, chunk_size=C, scale=scale, l2norm=l2norm, cumsum=cumsum)
  _, _, h, vn = forward_v3(pre, h0, heads=q.shape[2], need_o=False, store=True, chunk_size=C)
  dh, dh0, dvn = backward_state_v3(pre, do, dhT, chunk_size=C)
  if cumsum and GRAD_GATES != "kernel":
    gam, cumsum = cm.chunk_cumsum(gam, C), False
    if m is None and GRAD_GATES == "xla":
      B, Tp = gam.shape[:2]
      m, seg = jnp.ones((B, Tp, 1), jnp.float32), jnp.zeros((B, Tp, 1), jnp.float32)
  out = grads_v3(pre["a"], q, k, v, gam, beta, m, seg, h, dh, vn, dvn, do, chunk_size=C,
                 raw=l2norm or scale is not None, scale=scale, l2norm=l2norm, cumsum=cumsum)
  return out + (dh0,)
