"""Pallas (Triton lowering) flash attention for NVIDIA GPUs that only visits key blocks inside
the causal sliding window: work and time grow as ``T * window``, not ``T ** 2``.

Layout ``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]``; GQA without repeating K/V (each program reads
the kv head of its query head; the backward dK/dV kernel sums the ``Hq // Hkv`` query heads of
one kv head in registers). Optional ``segment_ids [B,T]`` for packed sequences.

Per query block ``[q0, q0 + bq)`` the visible keys lie in ``[q0 - W + 1, q0 + bq)``: the key
loop runs over those blocks only, and splits into a masked lower edge, an unmasked interior
(no per-element mask arithmetic) and the masked diagonal. Softmax runs in base 2 with
``scale * log2(e)`` folded into the scores; the saved log-sum-exp is base 2 too.
Backward is the usual recomputation: one kernel for dK/dV (parallel over key blocks), one for
dQ (parallel over query blocks); ``delta = rowsum(dO * O)`` is a fused XLA reduction.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Finite "minus infinity": a row whose keys in one block are all masked keeps finite state;
# its junk is erased (factor exp2(-huge) = 0) once the row meets its own key on the diagonal.
NEG = -1e30
_DOT = (((1,), (1,)), ((), ()))  # a @ b.T
_DOT_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=None):
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(qpos, kpos, window, qseg=None, kseg=None):
  m = kpos <= qpos
  if window is not None:
    m &= kpos > qpos - window
  if qseg is not None:
    m &= qseg == kseg
  return m


def _kv_block_range(q0, bq, bk, nk, window):
  """Key blocks [lo, hi) a query block sees; [lo_f, hi_f) of them need no mask."""
  hi = jnp.minimum((q0 + bq - 1) // bk + 1, nk)
  hi_f = jnp.minimum((q0 + 1) // bk, hi)
  if window is None:
    lo = jnp.int32(0)
    lo_f = jnp.int32(0)
  else:
    lo = jnp.maximum(q0 - window + 1, 0) // bk
    lo_f = jnp.clip(pl.cdiv(q0 + bq - window, bk), lo, hi)
  hi_f = jnp.maximum(hi_f, lo_f)
  return lo, lo_f, hi_f, hi


def _q_block_range(k0, bq, bk, nq, window):
  """Query blocks [lo, hi) that see key block [k0, k0 + bk); [lo_f, hi_f) need no mask."""
  lo = k0 // bq
  lo_f = jnp.minimum(pl.cdiv(k0 + bk - 1, bq), nq)
  if window is None:
    hi = jnp.int32(nq)
    hi_f = jnp.int32(nq)
  else:
    hi = jnp.minimum((k0 + bk - 1 + window - 1) // bq + 1, nq)
    hi_f = jnp.clip((k0 + window - bq) // bq + 1, lo_f, hi)
  lo_f = jnp.maximum(lo_f, lo)
  hi_f = jnp.maximum(hi_f, lo_f)
  return lo, lo_f, hi_f, hi


def _three_loops(lo, lo_f, hi_f, hi, body, carry, always_mask):
  """Run ``body(j, carry, masked)`` over [lo, hi): edges masked, interior not."""
  carry = lax.fori_loop(lo, lo_f, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(lo_f, hi_f, functools.partial(body, masked=always_mask), carry)
  return lax.fori_loop(hi_f, hi, functools.partial(body, masked=True), carry)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, qk_scale, window, bq, bk, nk, has_seg, fold_scale):
  if has_seg:
    q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    qs_ref = ks_ref = None
  q0 = pl.program_id(1) * bq
  q = q_ref[...]
  if fold_scale:  # one [bq, D] multiply instead of a [bq, bk] one per key block
    q = (q.astype(jnp.float32) * qk_scale).astype(q.dtype)
  d = q.shape[-1]
  qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  qseg = qs_ref[...][:, None] if has_seg else None

  def body(j, carry, masked):
    acc, m_i, l_i = carry
    k0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    s = _dot(q, k, _DOT)
    if not fold_scale:
      s = s * qk_scale
    if masked:
      kpos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      kseg = ks_ref[pl.ds(k0, bk)][None, :] if has_seg else None
      s = jnp.where(_mask(qpos, kpos, window, qseg, kseg), s, NEG)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l_i

  lo, lo_f, hi_f, hi = _kv_block_range(q0, bq, bk, nk, window)
  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), NEG, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  acc, m_i, l_i = _three_loops(lo, lo_f, hi_f, hi, body, carry, always_mask=has_seg)
  l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m_i + jnp.log2(l_safe)


def _fwd(q, k, v, seg, *, scale, window, block_q, block_k, num_warps, num_stages, interpret,
         fold_scale=False, heads_fastest=False):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  nq, nk = t // block_q, t // block_k
  has_seg = seg is not None
  head = lambda bh, gi: (bh % hkv) * g + gi
  if heads_fastest:
    # launch order runs the grid's first axis fastest: the g query heads of one kv head and
    # query block run side by side and share each K/V block through L2
    grid = (g, nq, b * hkv)
    ids = lambda f: (lambda gi, i, bh: f(bh, i, gi))
  else:
    grid = (b * hkv, nq, g)
    ids = lambda f: f
  in_specs = [
      pl.BlockSpec((None, block_q, None, d), ids(lambda bh, i, gi: (bh // hkv, i, head(bh, gi), 0))),
      pl.BlockSpec((None, t, None, d), ids(lambda bh, i, gi: (bh // hkv, 0, bh % hkv, 0))),
      pl.BlockSpec((None, t, None, d), ids(lambda bh, i, gi: (bh // hkv, 0, bh % hkv, 0))),
  ]
  args = [q, k, v]
  if has_seg:
    in_specs += [pl.BlockSpec((None, block_q), ids(lambda bh, i, gi: (bh // hkv, i))),
                 pl.BlockSpec((None, t), ids(lambda bh, i, gi: (bh // hkv, 0)))]
    args += [seg, seg]
  kernel = functools.partial(_fwd_kernel, qk_scale=scale * LOG2E, window=window, bq=block_q,
                             bk=block_k, nk=nk, has_seg=has_seg, fold_scale=fold_scale)
  o, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, block_q, None, d),
                       ids(lambda bh, i, gi: (bh // hkv, i, head(bh, gi), 0))),
          pl.BlockSpec((None, None, block_q), ids(lambda bh, i, gi: (bh // hkv, head(bh, gi), i))),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="swa_flash_fwd",
  )(*args)
  return o, lse


# ----------------------------------------------------------------------------- backward


def _dkv_kernel(*refs, qk_scale, scale, window, bq, bk, nq, g, has_seg):
  if has_seg:
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
  k0 = pl.program_id(1) * bk
  k = k_ref[...]
  v = v_ref[...]
  d = k.shape[-1]
  kpos = k0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
  kseg = ks_ref[...][:, None] if has_seg else None
  lo, lo_f, hi_f, hi = _q_block_range(k0, bq, bk, nq, window)

  def per_head(gi, carry):
    def body(i, carry, masked):
      dk, dv = carry
      q0 = pl.multiple_of(i * bq, bq)
      q = q_ref[pl.ds(q0, bq), gi, :]
      do = do_ref[pl.ds(q0, bq), gi, :]
      lse = lse_ref[gi, pl.ds(q0, bq)]
      delta = dl_ref[gi, pl.ds(q0, bq)]
      st = _dot(k, q, _DOT) * qk_scale  # [bk, bq]: scores transposed
      pt = jnp.exp2(st - lse[None, :])
      if masked:
        qpos = q0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        qseg = qs_ref[pl.ds(q0, bq)][None, :] if has_seg else None
        pt = jnp.where(_mask(qpos, kpos, window, qseg, kseg), pt, 0.0)
      dv = dv + _dot(pt.astype(do.dtype), do)
      dpt = _dot(v, do, _DOT)
      dst = pt * (dpt - delta[None, :])
      dk = dk + _dot(dst.astype(q.dtype), q)
      return dk, dv

    return _three_loops(lo, lo_f, hi_f, hi, body, carry, always_mask=has_seg)

  zeros = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(0, g, per_head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, qk_scale, scale, window, bq, bk, nk, has_seg):
  if has_seg:
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref = refs
  q0 = pl.program_id(1) * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = dl_ref[...]
  d = q.shape[-1]
  qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  qseg = qs_ref[...][:, None] if has_seg else None

  def body(j, dq, masked):
    k0 = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(k0, bk), :]
    v = v_ref[pl.ds(k0, bk), :]
    s = _dot(q, k, _DOT) * qk_scale
    p = jnp.exp2(s - lse[:, None])
    if masked:
      kpos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
      kseg = ks_ref[pl.ds(k0, bk)][None, :] if has_seg else None
      p = jnp.where(_mask(qpos, kpos, window, qseg, kseg), p, 0.0)
    dp = _dot(do, v, _DOT)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  lo, lo_f, hi_f, hi = _kv_block_range(q0, bq, bk, nk, window)
  dq = _three_loops(lo, lo_f, hi_f, hi, body, jnp.zeros((bq, d), jnp.float32),
                    always_mask=has_seg)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _bwd(q, k, v, seg, o, lse, do, *, scale, window, block_q, block_k, num_warps, num_stages,
         interpret):
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  has_seg = seg is not None
  # delta_t = sum_d dO * O  (= rowsum(P * dP)), in the log-sum-exp layout [B, Hq, T]
  delta = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), o.astype(jnp.float32))
  cp = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)

  # dK, dV: one program per (batch, kv head, key block), summing the g query heads.
  bq, bk = block_q, block_k
  nq = t // bq
  full_heads = lambda bh, j: (bh // hkv, 0, bh % hkv, 0)
  in_specs = [
      pl.BlockSpec((None, t, g, d), full_heads),
      pl.BlockSpec((None, bk, None, d), lambda bh, j: (bh // hkv, j, bh % hkv, 0)),
      pl.BlockSpec((None, bk, None, d), lambda bh, j: (bh // hkv, j, bh % hkv, 0)),
      pl.BlockSpec((None, t, g, d), full_heads),
      pl.BlockSpec((None, g, t), lambda bh, j: (bh // hkv, bh % hkv, 0)),
      pl.BlockSpec((None, g, t), lambda bh, j: (bh // hkv, bh % hkv, 0)),
  ]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += [pl.BlockSpec((None, t), lambda bh, j: (bh // hkv, 0)),
                 pl.BlockSpec((None, bk), lambda bh, j: (bh // hkv, j))]
    args += [seg, seg]
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda bh, j: (bh // hkv, j, bh % hkv, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, qk_scale=scale * LOG2E, scale=scale, window=window, bq=bq,
                        bk=bk, nq=nq, g=g, has_seg=has_seg),
      grid=(b * hkv, t // bk),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cp,
      interpret=interpret,
      name="swa_flash_bwd_dkv",
  )(*args)

  # dQ: one program per (batch, query head, query block), like the forward.
  bq, bk = block_k, block_q  # transposed roles: long query block, short key block
  head = lambda bh, gi: (bh % hkv) * g + gi
  q_spec = pl.BlockSpec((None, bq, None, d), lambda bh, i, gi: (bh // hkv, i, head(bh, gi), 0))
  kv_full = pl.BlockSpec((None, t, None, d), lambda bh, i, gi: (bh // hkv, 0, bh % hkv, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda bh, i, gi: (bh // hkv, head(bh, gi), i))
  in_specs = [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec]
  args = [q, k, v, do, lse, delta]
  if has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda bh, i, gi: (bh // hkv, i)),
                 pl.BlockSpec((None, t), lambda bh, i, gi: (bh // hkv, 0))]
    args += [seg, seg]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, qk_scale=scale * LOG2E, scale=scale, window=window, bq=bq,
                        bk=bk, nk=t // bk, has_seg=has_seg),
      grid=(b * hkv, t // bq, g),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cp,
      interpret=interpret,
      name="swa_flash_bwd_dq",
  )(*args)
  return dq, dk, dv


# ----------------------------------------------------------------------------- public


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg):
  return _fwd(q, k, v, seg, **cfg.fwd)[0]


def _flash_fwd(q, k, v, seg, cfg):
  o, lse = _fwd(q, k, v, seg, **cfg.fwd)
  return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _bwd(q, k, v, seg, o, lse, do, **cfg.bwd)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


class _Config:
  """Hashable static configuration (custom_vjp's non-differentiable argument)."""

  def __init__(self, **kw):
    self._kw = tuple(sorted(kw.items()))
    common = {k: kw[k] for k in ("scale", "window", "interpret")}
    self.fwd = dict(common, block_q=kw["block_q"], block_k=kw["block_k"],
                    num_warps=kw["num_warps"], num_stages=kw["num_stages"],
                    fold_scale=kw["fold_scale"], heads_fastest=kw["heads_fastest"])
    self.bwd = dict(common, block_q=kw["bwd_block_q"], block_k=kw["bwd_block_k"],
                    num_warps=kw["bwd_num_warps"], num_stages=kw["bwd_num_stages"])

  def __hash__(self):
    return hash(self._kw)

  def __eq__(self, other):
    return isinstance(other, _Config) and self._kw == other._kw


def flash_attention(q, k, v, *, window, segment_ids=None, scale=None, block_q=128, block_k=128,
                    num_warps=8, num_stages=3, bwd_block_q=64, bwd_block_k=128, bwd_num_warps=8,
                    bwd_num_stages=3, fold_scale=False, heads_fastest=False, interpret=False):
  """Sliding-window (``window=None``: full) causal attention, ``q [B,T,Hq,D]``,
  ``k, v [B,T,Hkv,D]``, optional ``segment_ids [B,T]``. Differentiable.

  The backward dK/dV kernel uses ``bwd_block_q`` queries x ``bwd_block_k`` keys; the dQ kernel
  uses the transposed sizes. Defaults are the fastest measured on an H100 (JAX 0.11.2, D=128,
  W=8192; benchmarks/swa_kernel_notes.md). A sequence length that is not a multiple of the blocks is padded
  (padded keys lie after every real query, so causality already hides them).
  """
  b, t, hq, d = q.shape
  if hq % k.shape[2]:
    raise ValueError(f"q heads {hq} must be a multiple of kv heads {k.shape[2]}")
  scale = d ** -0.5 if scale is None else float(scale)
  mult = math.lcm(block_q, block_k, bwd_block_q, bwd_block_k)
  tp = -(-t // mult) * mult
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  if tp != t:
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
    if seg is not None:
      seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=-1)
  if window is not None and window >= tp:
    window = None  # the window covers everything: plain causal, fewer index operations
  cfg = _Config(scale=scale, window=window, interpret=interpret, block_q=block_q,
                block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, bwd_num_warps=bwd_num_warps,
                bwd_num_stages=bwd_num_stages, fold_scale=fold_scale,
                heads_fastest=heads_fastest)
  o = _flash(q, k, v, seg, cfg)
  return o[:, :t]
