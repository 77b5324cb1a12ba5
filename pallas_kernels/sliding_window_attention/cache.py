"""Attention of a chunk of new tokens against a ring-buffer KV cache plus the chunk itself.

Shapes: ``q [B,C,Hq,D]``, ``k, v [B,C,Hkv,D]`` (the new chunk, C = 1 for decode),
``cache_k, cache_v [B,L,Hkv,D]`` (ring buffer; ``L = window - 1`` for sliding-window layers,
a maximum length for full-attention layers), ``cache_positions [B,L] int32`` (absolute
sequence index held by each slot, -1 if empty), ``q_positions [B,C] int32`` (absolute index
of each new token, -1 for padding).

A query at position ``p`` sees cache slots with a valid position in ``(p - window, p)`` and
chunk keys with a valid position in ``(p - window, p]`` (``window=None``: no lower bound).
Call ``attend_to_cache`` before ``ring_buffer_write`` for the same chunk.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _compat
from pallas_kernels.sliding_window_attention.reference import masked_softmax_attention, visible


def _check_cache_shapes(q, k, cache_k, scale):
  """``(b, c, hq, d, hkv, scale)`` of a chunk-against-cache call; a ValueError naming the shapes if they do not fit."""
  b, c, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv or cache_k.shape[2] != hkv or cache_k.shape[3] != d:
    raise ValueError(f"shapes do not fit: q {q.shape}, k {k.shape}, cache_k {cache_k.shape}")
  return b, c, hq, d, hkv, d ** -0.5 if scale is None else scale


def attend_to_cache_reference(q, k, v, cache_k, cache_v, cache_positions, q_positions, *,
                              window, scale=None):
  """Pure-JAX oracle: one masked softmax over [cache slots | chunk keys]."""
  b, c, hq, d, hkv, scale = _check_cache_shapes(q, k, cache_k, scale)
  cache_positions = cache_positions.astype(jnp.int32)
  q_positions = q_positions.astype(jnp.int32)
  m_cache = visible(q_positions, cache_positions, window, inclusive=False)  # [B,C,L]
  m_chunk = visible(q_positions, q_positions, window, inclusive=True)      # [B,C,C]
  mask = jnp.concatenate([m_cache, m_chunk], axis=-1)[:, None, None]
  keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
  vals = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
  o = masked_softmax_attention(q.reshape(b, c, hkv, hq // hkv, d), keys, vals, mask, scale)
  return o.reshape(b, c, hq, d).astype(q.dtype)


def attend_to_cache_xla(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window, scale=None):
  """Same result as the reference without concatenating the cache and the chunk.

  The reference's ``[cache | chunk]`` keys are a copy of the whole ring buffer per call (for decode, 2 x 4 MB per
  layer at the 4B model's window, to attend with one query). Here the two parts get their own logits and share one
  softmax: a joint row maximum and denominator, then ``p_cache @ cache_v + p_chunk @ v``. Float32 softmax; a row
  with no visible key gives zeros.
  """
  b, c, hq, d, hkv, scale = _check_cache_shapes(q, k, cache_k, scale)
  q_positions = q_positions.astype(jnp.int32)
  qg = q.reshape(b, c, hkv, hq // hkv, d)
  parts = []
  for keys, vals, kpos, inclusive in ((cache_k, cache_v, cache_positions.astype(jnp.int32), False),
                                      (k, v, q_positions, True)):
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST) * scale
    mask = visible(q_positions, kpos, window, inclusive=inclusive)[:, None, None]
    parts.append((jnp.where(mask, s, -jnp.inf), vals))
  m = jnp.maximum(*(jnp.max(s, axis=-1, keepdims=True) for s, _ in parts))
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no visible key
  ps = [jnp.exp(s - m) for s, _ in parts]
  l = sum(jnp.sum(p, axis=-1, keepdims=True) for p in ps)
  inv = 1.0 / jnp.where(l == 0.0, 1.0, l)
  o = sum(jnp.einsum("bhgqk,bkhd->bqhgd", (p * inv).astype(vals.dtype) if vals.dtype != jnp.float32 else p * inv,
                     vals, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
          for p, (_, vals) in zip(ps, parts))
  return o.reshape(b, c, hq, d).astype(q.dtype)


def ring_buffer_write(cache_k, cache_v, cache_positions, k, v, positions):
  """Write each valid new token (``positions >= 0``) into slot ``position % L``.

  Functional and jittable. Positions within a batch row must be distinct; when the chunk is
  longer than the buffer only the last ``L`` positions are kept (the older ones would be
  overwritten anyway), so no two kept tokens share a slot and the scatter is deterministic.
  Returns ``(cache_k, cache_v, cache_positions)``.
  """
  b, length = cache_positions.shape
  positions = positions.astype(jnp.int32)
  newest = jnp.max(positions, axis=1, keepdims=True)
  keep = (positions >= 0) & (positions > newest - length)
  slot = jnp.where(keep, positions % length, length)  # slot L is out of range: dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], slot.shape)
  cache_k = cache_k.at[rows, slot].set(k.astype(cache_k.dtype), mode="drop")
  cache_v = cache_v.at[rows, slot].set(v.astype(cache_v.dtype), mode="drop")
  cache_positions = cache_positions.at[rows, slot].set(positions, mode="drop")
  return cache_k, cache_v, cache_positions


def init_ring_buffer(batch, length, kv_heads, head_dim, dtype=jnp.bfloat16):
  """An empty cache: zeros and every position -1."""
  z = jnp.zeros((batch, length, kv_heads, head_dim), dtype)
  return z, z, jnp.full((batch, length), -1, jnp.int32)


# ----------------------------------------------------------------------------- GPU kernel

_NEG = -1e30


def _cache_kernel(q_ref, qp_ref, bounds_ref, ck_ref, cv_ref, cp_ref, k_ref, v_ref, kp_ref, o_ref, *,
                  qk_scale, window, bq, bk, length):
  q = q_ref[...]
  qpos = qp_ref[...][:, None]
  d = q.shape[-1]

  def step(carry, k, v, kpos, extra_mask):
    acc, m_i, l_i = carry
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    vis = extra_mask & (kpos >= 0) & (qpos >= 0)
    if window is not None:
      vis &= kpos > qpos - window
    s = jnp.where(vis, s * qk_scale, _NEG)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_i

  def cache_body(j, carry):
    # the last block is shifted back to end at L (no out-of-range reads); slots it shares
    # with the previous block are masked out by `fresh`
    k0 = jnp.minimum(j * bk, length - bk)
    slot = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    kpos = cp_ref[pl.ds(k0, bk)][None, :]
    fresh = slot >= j * bk
    return step(carry, ck_ref[pl.ds(k0, bk), :], cv_ref[pl.ds(k0, bk), :], kpos,
                fresh & (kpos < qpos))

  def chunk_body(j, carry):
    k0 = pl.multiple_of(j * bk, bk)
    kpos = kp_ref[pl.ds(k0, bk)][None, :]
    return step(carry, k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :], kpos, kpos <= qpos)

  carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  # only the key blocks that some query of this row block may see (``_key_block_bounds``)
  carry = lax.fori_loop(bounds_ref[0], bounds_ref[1], cache_body, carry)
  acc, _, l_i = lax.fori_loop(bounds_ref[2], bounds_ref[3], chunk_body, carry)
  o_ref[...] = (acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]).astype(o_ref.dtype)


def _fit_ring(cache_k, cache_v, cache_positions, block_k):
  """The ring as the kernels read it: positions as int32, and a buffer shorter than one key block padded with empty
  slots so that one block fits."""
  cpos = cache_positions.astype(jnp.int32)
  extra = block_k - cache_k.shape[1]
  if extra > 0:
    cache_k = jnp.pad(cache_k, ((0, 0), (0, extra), (0, 0), (0, 0)))
    cache_v = jnp.pad(cache_v, ((0, 0), (0, extra), (0, 0), (0, 0)))
    cpos = jnp.pad(cpos, ((0, 0), (0, extra)), constant_values=-1)
  return cache_k, cache_v, cpos


def _key_block_bounds(rpos, cpos, kpos, *, window, block_q, block_k):
  """``[B, row blocks, 4]`` int32: per block of query rows, the ranges ``[lo, hi)`` of cache key blocks and of chunk
  key blocks holding every key some query of the row block can see (from the positions: bounds on the row block's
  real query positions; blocks inside a range that are invisible are still masked). Prefill skips the chunk's
  future and, when the visible slots of the ring do not wrap around its end, the slots that left the window."""
  b = rpos.shape[0]
  rq = rpos.reshape(b, -1, block_q)
  valid = rq >= 0
  q_hi = jnp.max(jnp.where(valid, rq, -1), axis=-1)[..., None]  # [B, nrb, 1]
  q_lo = jnp.min(jnp.where(valid, rq, jnp.iinfo(jnp.int32).max), axis=-1)[..., None]

  def block_range(pos, strict):
    pos = pos[:, None, :]  # [B, 1, n]
    live = (pos >= 0) & ((pos < q_hi) if strict else (pos <= q_hi))
    if window is not None:
      live &= pos > q_lo - window
    idx = jnp.arange(pos.shape[-1], dtype=jnp.int32)
    hi = jnp.max(jnp.where(live, idx, -1), axis=-1) // block_k + 1  # 0 when nothing is live
    lo = jnp.minimum(jnp.min(jnp.where(live, idx, pos.shape[-1]), axis=-1) // block_k, hi)
    return lo, hi

  c_lo, c_hi = block_range(cpos, strict=True)
  k_lo, k_hi = block_range(kpos, strict=False)
  return jnp.stack([c_lo, c_hi, k_lo, k_hi], axis=-1).astype(jnp.int32)


# Launch parameters of ``attend_to_cache_pallas`` by chunk length: decode-sized chunks keep the small row blocks the
# kernel was first measured with; prefill chunks (``rows = chunk x Hq/Hkv`` in the thousands) take flash-attention-
# sized tiles, so each K/V block read from the cache serves 128 query rows.
SMALL_CHUNK_CONFIG = dict(block_q=16, block_k=64, num_warps=4, num_stages=2)
PREFILL_CONFIG = dict(block_q=128, block_k=64, num_warps=8, num_stages=3)
PREFILL_MIN_ROWS = 256  # chunk x Hq/Hkv from which PREFILL_CONFIG is used


def launch_config(chunk: int, group: int) -> dict:
  """``attend_to_cache_pallas``'s default block sizes and launch parameters for ``chunk`` queries per row, ``group``
  query heads per kv head."""
  return dict(PREFILL_CONFIG if chunk * group >= PREFILL_MIN_ROWS else SMALL_CHUNK_CONFIG)


def attend_to_cache_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window,
                           scale=None, block_q=None, block_k=None, num_warps=None, num_stages=None,
                           interpret=False):
  """Pallas (Triton) kernel for ``attend_to_cache``: one program per (batch, kv head, block of
  query rows), where the rows are the chunk's queries times the ``Hq // Hkv`` heads sharing
  the kv head, so the cache is read once per kv head (decode is bound by that read). Each program
  walks only the key blocks its queries may see (``_key_block_bounds``). Launch parameters left
  None come from ``launch_config`` (by chunk length)."""
  b, c, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  cfg = launch_config(c, g)
  block_q = cfg["block_q"] if block_q is None else block_q
  block_k = cfg["block_k"] if block_k is None else block_k
  num_warps = cfg["num_warps"] if num_warps is None else num_warps
  num_stages = cfg["num_stages"] if num_stages is None else num_stages
  scale = d ** -0.5 if scale is None else scale
  # rows r = (chunk index, head in group): [B, Hkv, C*G, D]
  rows = jnp.transpose(q.reshape(b, c, hkv, g, d), (0, 2, 1, 3, 4)).reshape(b, hkv, c * g, d)
  rpos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
  r = rows.shape[2]
  rp = -(-r // block_q) * block_q
  rows = jnp.pad(rows, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
  rpos = jnp.pad(rpos, ((0, 0), (0, rp - r)), constant_values=-1)
  cp = -(-c // block_k) * block_k
  kpos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, cp - c)), constant_values=-1)
  pad_c = lambda x: jnp.pad(x, ((0, 0), (0, cp - c), (0, 0), (0, 0)))
  k, v = pad_c(k), pad_c(v)
  cache_k, cache_v, cpos = _fit_ring(cache_k, cache_v, cache_positions, block_k)
  length = cache_k.shape[1]
  bounds = _key_block_bounds(rpos, cpos, kpos, window=window, block_q=block_q, block_k=block_k)
  kv_spec = lambda n: pl.BlockSpec((None, n, None, d), lambda bh, i: (bh // hkv, 0, bh % hkv, 0))
  pos_spec = lambda n: pl.BlockSpec((None, n), lambda bh, i: (bh // hkv, 0))
  row_spec = pl.BlockSpec((None, None, block_q, d), lambda bh, i: (bh // hkv, bh % hkv, i, 0))
  kernel = functools.partial(_cache_kernel, qk_scale=scale * math.log2(math.e), window=window,
                             bq=block_q, bk=block_k, length=length)
  o = pl.pallas_call(
      kernel,
      grid=(b * hkv, rp // block_q),
      in_specs=[row_spec, pl.BlockSpec((None, block_q), lambda bh, i: (bh // hkv, i)),
                pl.BlockSpec((None, None, 4), lambda bh, i: (bh // hkv, i, 0)),
                kv_spec(length), kv_spec(length), pos_spec(length),
                kv_spec(cp), kv_spec(cp), pos_spec(cp)],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="swa_attend_to_cache",
  )(rows, rpos, bounds, cache_k, cache_v.astype(cache_k.dtype), cpos, k.astype(cache_k.dtype),
    v.astype(cache_k.dtype), kpos)
  o = o[:, :, :r].reshape(b, hkv, c, g, d)
  return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(b, c, hq, d)


# ----------------------------------------------------------------------------- GPU decode kernel (one query per row)

# Decode reads the whole ring once per kv head for a handful of query rows, so the work is split along the ring
# ("split-K", flash-decoding): DECODE_SPLITS programs per (row, kv head), each over a contiguous run of key blocks,
# write unnormalised partial results; a small XLA combine merges them with the new token's own key. At the 4B
# model's shape (ring 8191, 2 kv heads, batch 1) that is 256 programs of one 64-key block each (in the decode step on
# an H200: 2.811 ms/token against 2.825 with 64 splits of two blocks, 2.813 with 32 splits of two 128-key blocks).
DECODE_SPLITS = 128
DECODE_BLOCK_K = 64
DECODE_ROWS = 16  # query rows per program (the heads of a kv group, padded: Triton dots take >= 16 rows)


def _rotate_halves(x_ref, cos_ref, sin_ref, dtype):
  """The rotate-half rotary embedding of ``x_ref [..., D]`` (read as its two halves) with ``cos, sin [D]``, in
  float32, returned as its two halves rounded to ``dtype`` (what an XLA rotary before the kernel would give)."""
  h = x_ref.shape[-1] // 2
  xa = x_ref[..., pl.ds(0, h)].astype(jnp.float32)
  xb = x_ref[..., pl.ds(h, h)].astype(jnp.float32)
  ca, cb = cos_ref[pl.ds(0, h)].astype(jnp.float32), cos_ref[pl.ds(h, h)].astype(jnp.float32)
  sa, sb = sin_ref[pl.ds(0, h)].astype(jnp.float32), sin_ref[pl.ds(h, h)].astype(jnp.float32)
  return (xa * ca - xb * sa).astype(dtype), (xb * cb + xa * sb).astype(dtype)


def _decode_kernel(*refs, qk_scale, window, bk, length, per_split, rotary):
  if rotary:  # q rows unrotated, with the row's rotary cos / sin
    q_ref, cos_ref, sin_ref, qp_ref, ck_ref, cv_ref, cp_ref, acc_ref, m_ref, l_ref = refs
    q = _rotate_halves(q_ref, cos_ref, sin_ref, ck_ref.dtype)  # ([R, D/2], [R, D/2])
  else:
    q_ref, qp_ref, ck_ref, cv_ref, cp_ref, acc_ref, m_ref, l_ref = refs
    q = q_ref[...]  # [R, D]
  qpos = qp_ref[...][:, None]  # [R, 1]
  nblocks = -(-length // bk)
  j0 = pl.program_id(1) * per_split
  j1 = jnp.minimum(j0 + per_split, nblocks)
  half = ck_ref.shape[-1] // 2

  def scores(k0):
    # float32 operands (tests) at full precision: the GPU's default would be TF32
    dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    if not rotary:
      return dot(q, ck_ref[pl.ds(k0, bk), :])
    return dot(q[0], ck_ref[pl.ds(k0, bk), pl.ds(0, half)]) + dot(q[1], ck_ref[pl.ds(k0, bk), pl.ds(half, half)])

  def body(j, carry):
    acc, m_i, l_i = carry
    # the last block is shifted back to end at L (no out-of-range reads); its slots that the previous block holds
    # are masked out by `fresh`
    k0 = jnp.minimum(j * bk, length - bk)
    slot = k0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    kpos = cp_ref[pl.ds(k0, bk)][None, :]
    vis = (slot >= j * bk) & (kpos >= 0) & (kpos < qpos) & (qpos >= 0)
    if window is not None:
      vis &= kpos > qpos - window
    v = cv_ref[pl.ds(k0, bk), :]
    s = jnp.where(vis, scores(k0) * qk_scale, _NEG)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                         precision=lax.Precision.HIGHEST)
    return acc, m_new, l_i

  r, d = acc_ref.shape
  carry = (jnp.zeros((r, d), jnp.float32), jnp.full((r,), _NEG, jnp.float32), jnp.zeros((r,), jnp.float32))
  acc, m_i, l_i = lax.fori_loop(j0, j1, body, carry)
  acc_ref[...] = acc
  m_ref[...] = m_i
  l_ref[...] = l_i


def _decode_partials(q, cache_k, cache_v, cache_positions, q_positions, *, window, qk_scale, hkv, splits, block_k,
                     num_warps, num_stages, interpret, rotary=None):
  """The split-ring kernel's partials (``interpret`` None: compiled on a GPU, interpreted elsewhere) ``acc [B Hkv, S,
  rows, D]``, ``m, l [B Hkv, S, rows]`` float32 (S a power of two: splits past the ring's blocks are empty, m = -1e30
  and l = acc = 0). Row ``i`` of kv head ``h``'s partials is query head ``h * G + i`` (G = Hq / Hkv), rows past G
  padding.

  ``rotary = (hq, cos, sin)``: ``q`` is instead the unrotated projection ``[R >= B, Hq + 2 Hkv, D]`` (query heads
  first) and the kernel applies the rotary embedding (``cos, sin [B, D]``) as it reads it, taking whole ``rows``-head
  blocks of it (``rotary_decode_supported``); row ``i`` of kv head ``h``'s partials is then query head
  ``(h * G) // rows * rows + i``."""
  b = cache_k.shape[0]
  d = q.shape[-1]
  hq = q.shape[2] if rotary is None else rotary[0]
  g = hq // hkv
  rows_n = max(DECODE_ROWS, 1 << (g - 1).bit_length())
  cache_k, cache_v, cpos = _fit_ring(cache_k, cache_v, cache_positions, block_k)
  length = cache_k.shape[1]
  nblocks = -(-length // block_k)
  per_split = -(-nblocks // min(splits, nblocks))
  n_splits = 1 << (-(-nblocks // per_split) - 1).bit_length()
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  rpos = jnp.broadcast_to(q_positions.astype(jnp.int32), (b, rows_n))
  kv_spec = pl.BlockSpec((None, length, None, d), lambda bh, i: (bh // hkv, 0, bh % hkv, 0))
  pos_spec = pl.BlockSpec((None, rows_n), lambda bh, i: (bh // hkv, 0))
  if rotary is None:
    rows = jnp.pad(q.reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, rows_n - g), (0, 0))).astype(cache_k.dtype)
    q_in = [rows, rpos]
    q_specs = [pl.BlockSpec((None, None, rows_n, d), lambda bh, i: (bh // hkv, bh % hkv, 0, 0)), pos_spec]
  else:
    _, cos, sin = rotary
    row_spec = pl.BlockSpec((None, d), lambda bh, i: (bh // hkv, 0))
    q_in = [q, cos, sin, rpos]
    q_specs = [pl.BlockSpec((None, rows_n, d), lambda bh, i: (bh // hkv, (bh % hkv) * g // rows_n, 0)), row_spec,
               row_spec, pos_spec]
  return pl.pallas_call(
      functools.partial(_decode_kernel, qk_scale=qk_scale, window=window, bk=block_k, length=length,
                        per_split=per_split, rotary=rotary is not None),
      grid=(b * hkv, n_splits),
      in_specs=[*q_specs, kv_spec, kv_spec, pl.BlockSpec((None, length), lambda bh, i: (bh // hkv, 0))],
      out_specs=[pl.BlockSpec((None, None, rows_n, d), lambda bh, i: (bh, i, 0, 0)),
                 pl.BlockSpec((None, None, rows_n), lambda bh, i: (bh, i, 0)),
                 pl.BlockSpec((None, None, rows_n), lambda bh, i: (bh, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((b * hkv, n_splits, rows_n, d), jnp.float32),
                 jax.ShapeDtypeStruct((b * hkv, n_splits, rows_n), jnp.float32),
                 jax.ShapeDtypeStruct((b * hkv, n_splits, rows_n), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="swa_decode",
  )(*q_in, cache_k, cache_v.astype(cache_k.dtype), cpos)


def attend_to_cache_decode_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window, scale=None,
                                  splits=None, block_k=None, num_warps=4, num_stages=2, interpret=None):
  """``attend_to_cache`` for one query per row (decode) as a split-ring Pallas (Triton) kernel plus an XLA combine.

  Grid (batch x kv heads, splits): each program takes the ``Hq // Hkv`` query heads of its kv head (padded to
  ``DECODE_ROWS`` rows) against a contiguous run of ``block_k``-slot blocks of the ring, and writes its unnormalised
  output, row maximum and row sum (base-2 exponents). The combine rescales the partials to a joint maximum, adds the
  new token's own key and value (a query always sees itself), and normalises; a row with nothing visible (a padding
  query) gives zeros."""
  b, c, hq, d, hkv, scale = _check_cache_shapes(q, k, cache_k, scale)
  if c != 1:
    raise ValueError(f"attend_to_cache_decode_pallas takes one query per row, got a chunk of {c}")
  g = hq // hkv
  qk_scale = scale * math.log2(math.e)
  acc, m, l = _decode_partials(q, cache_k, cache_v, cache_positions, q_positions, window=window, qk_scale=qk_scale,
                               hkv=hkv, splits=DECODE_SPLITS if splits is None else splits,
                               block_k=DECODE_BLOCK_K if block_k is None else block_k, num_warps=num_warps,
                               num_stages=num_stages, interpret=interpret)
  f32 = jnp.float32
  n_splits, rows_n = m.shape[1:]
  acc = acc.reshape(b, hkv, n_splits, rows_n, d)[:, :, :, :g]
  m = m.reshape(b, hkv, n_splits, rows_n)[:, :, :, :g]
  l = l.reshape(b, hkv, n_splits, rows_n)[:, :, :, :g]
  # the new token's own key: visible to its query unless the query is padding
  qg = q.reshape(b, hkv, g, d)
  s_new = jnp.einsum("bhgd,bhd->bhg", qg.astype(f32), k[:, 0].astype(f32)) * qk_scale
  live = (q_positions.astype(jnp.int32) >= 0)[:, :, None]  # [B, 1, 1]
  top = jnp.maximum(jnp.max(m, axis=2), jnp.where(live, s_new, _NEG))  # [B, Hkv, G]
  w = jnp.exp2(m - top[:, :, None])
  w_new = jnp.where(live, jnp.exp2(s_new - top), 0.0)
  den = jnp.sum(l * w, axis=2) + w_new
  num = jnp.sum(acc * w[..., None], axis=2) + w_new[..., None] * v[:, 0].astype(f32)[:, :, None, :]
  o = num / jnp.where(den == 0.0, 1.0, den)[..., None]
  return o.reshape(b, 1, hq, d).astype(q.dtype)


def _combine_write_kernel(acc_ref, m_ref, l_ref, q_ref, k_ref, v_ref, *refs, qk_scale, rows, heads, group, length,
                          rotary):
  if rotary:
    cos_ref, sin_ref, qp_ref, ck_ref, cv_ref, cp_ref, o_ref, ck_out, cv_out, cp_out = refs
  else:
    qp_ref, ck_ref, cv_ref, cp_ref, o_ref, ck_out, cv_out, cp_out = refs
  del ck_ref, cv_ref, cp_ref  # aliased to the outputs: written in place, never read here
  f32 = jnp.float32
  n = pl.program_id(0)
  real = n // heads < rows

  @pl.when(real)
  def _():
    qpos = qp_ref[0]
    live = qpos >= 0
    m, l, acc = m_ref[...], l_ref[...], acc_ref[...]  # [S], [S], [S, D]
    if rotary:  # the new key and the query rotated here, each as its two halves
      kn = _rotate_halves(k_ref, cos_ref, sin_ref, ck_out.dtype)
      qn = _rotate_halves(q_ref, cos_ref, sin_ref, ck_out.dtype)
      qk = sum(jnp.sum(a.astype(f32) * b.astype(f32)) for a, b in zip(qn, kn))
    else:
      kn = k_ref[...]
      qk = jnp.sum(q_ref[...].astype(f32) * kn.astype(f32))
    s_new = jnp.where(live, qk * qk_scale, _NEG)
    top = jnp.maximum(jnp.max(m), s_new)
    w = jnp.exp2(m - top)
    w_new = jnp.where(live, jnp.exp2(s_new - top), 0.0)
    den = jnp.sum(l * w) + w_new
    num = jnp.sum(acc * w[:, None], axis=0) + w_new * v_ref[...].astype(f32)
    o_ref[...] = (num / jnp.where(den == 0.0, 1.0, den)).astype(o_ref.dtype)
    first = n % group == 0  # one program per (row, kv head) writes the new key and value into slot position % L

    @pl.when(live & first)
    def _():
      slot = qpos % length
      if rotary:
        half = ck_out.shape[-1] // 2
        ck_out[pl.ds(slot, 1), pl.ds(0, half)] = kn[0][None, :]
        ck_out[pl.ds(slot, 1), pl.ds(half, half)] = kn[1][None, :]
      else:
        ck_out[pl.ds(slot, 1), :] = kn[None, :].astype(ck_out.dtype)
      cv_out[pl.ds(slot, 1), :] = v_ref[...][None, :].astype(cv_out.dtype)

    @pl.when(live & (n % heads == 0))
    def _():
      cp_out[pl.ds(qpos % length, 1)] = jnp.full((1,), qpos, cp_out.dtype)

  @pl.when(jnp.logical_not(real))
  def _():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _program_row(n, hq, b):
  """The batch row whose inputs program ``n`` of the combine grid (``out_rows x Hq``) reads: rows past B read row
  B - 1's blocks (and write only zeros)."""
  return jnp.minimum(n // hq, b - 1)


def _combine_and_write(acc, m, l, cache_k, cache_v, cache_positions, q_positions, q_args, q_specs, *, b, hq, hkv,
                       qk_scale, out_rows, partial_row, rotary, num_warps, interpret):
  """The combine kernel over ``out_rows x Hq`` programs: ``q_args`` / ``q_specs`` are the query, new key and new value
  (and with ``rotary`` the cos / sin rows) and their per-program blocks; ``partial_row(n)``: the row of the
  partials holding program ``n``'s query head."""
  d = cache_k.shape[-1]
  g = hq // hkv
  length = cache_k.shape[1]
  n_splits = m.shape[1]
  r_ = functools.partial(_program_row, hq=hq, b=b)
  part = lambda n: r_(n) * hkv + (n % hq) // g
  ring = pl.BlockSpec((None, length, None, d), lambda n: (r_(n), 0, (n % hq) // g, 0))
  pos = pl.BlockSpec((None, length), lambda n: (r_(n), 0))
  n_in = 3 + len(q_args) + 1
  o, ck, cv, cp = pl.pallas_call(
      functools.partial(_combine_write_kernel, qk_scale=qk_scale, rows=b, heads=hq, group=g, length=length,
                        rotary=rotary),
      grid=(out_rows * hq,),
      in_specs=[pl.BlockSpec((None, n_splits, None, d), lambda n: (part(n), 0, partial_row(n), 0)),
                pl.BlockSpec((None, n_splits, None), lambda n: (part(n), 0, partial_row(n))),
                pl.BlockSpec((None, n_splits, None), lambda n: (part(n), 0, partial_row(n))),
                *q_specs, pl.BlockSpec((None, 1), lambda n: (r_(n), 0)), ring, ring, pos],
      out_specs=[pl.BlockSpec((None, None, d), lambda n: (n // hq, n % hq, 0)), ring, ring, pos],
      out_shape=[jax.ShapeDtypeStruct((out_rows, hq, d), q_args[0].dtype),
                 jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype), jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype),
                 jax.ShapeDtypeStruct(cache_positions.shape, jnp.int32)],
      input_output_aliases={n_in: 1, n_in + 1: 2, n_in + 2: 3},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="swa_decode_combine",
  )(acc, m, l, *q_args, q_positions.astype(jnp.int32), cache_k, cache_v, cache_positions.astype(jnp.int32))
  return o, ck, cv, cp


def decode_attend_and_write_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window, scale=None,
                                   out_rows=None, splits=None, block_k=None, num_warps=4, num_stages=2,
                                   interpret=None):
  """One decode step of an attention layer against its ring: ``attend_to_cache`` then ``ring_buffer_write``, as the
  split-ring kernel plus a second Pallas kernel that combines the partials with the new token's own key and writes
  the new key, value and position into the ring in place (after every read of it: no copy of the buffers).

  Returns ``(o [out_rows, Hq, D], cache_k, cache_v, cache_positions)``: rows past B of ``o`` are zeros (the next
  product may run a single row as two). A ring shorter than one key block takes the separate steps."""
  b, c, hq, d, hkv, scale = _check_cache_shapes(q, k, cache_k, scale)
  if c != 1:
    raise ValueError(f"decode_attend_and_write_pallas takes one query per row, got a chunk of {c}")
  out_rows = b if out_rows is None else out_rows
  block_k = DECODE_BLOCK_K if block_k is None else block_k
  length = cache_k.shape[1]
  if length < block_k:
    o = attend_to_cache_decode_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions, window=window,
                                      scale=scale, splits=splits, block_k=block_k, interpret=interpret)
    o = jnp.pad(o[:, 0], ((0, out_rows - b), (0, 0), (0, 0)))
    return (o, *ring_buffer_write(cache_k, cache_v, cache_positions, k, v, q_positions))
  g = hq // hkv
  qk_scale = scale * math.log2(math.e)
  acc, m, l = _decode_partials(q, cache_k, cache_v, cache_positions, q_positions, window=window, qk_scale=qk_scale,
                               hkv=hkv, splits=DECODE_SPLITS if splits is None else splits, block_k=block_k,
                               num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  r_ = functools.partial(_program_row, hq=hq, b=b)
  vec_kv = pl.BlockSpec((None, None, d), lambda n: (r_(n), (n % hq) // g, 0))
  q_specs = [pl.BlockSpec((None, None, d), lambda n: (r_(n), n % hq, 0)), vec_kv, vec_kv]
  return _combine_and_write(acc, m, l, cache_k, cache_v, cache_positions, q_positions,
                            [q.reshape(b, hq, d), k.reshape(b, hkv, d), v.reshape(b, hkv, d)], q_specs, b=b, hq=hq,
                            hkv=hkv, qk_scale=qk_scale, out_rows=out_rows, partial_row=lambda n: n % g, rotary=False,
                            num_warps=num_warps, interpret=interpret)


def rotary_decode_supported(num_heads: int, num_kv_heads: int, head_dim: int, ring_length: int,
                            block_k: int | None = None) -> bool:
  """Whether ``decode_attend_and_write_rotary_pallas`` takes these shapes: whole blocks of ``DECODE_ROWS`` (or the
  group size, if larger) query heads, a power-of-two group size, halves of the head at least 16 wide (the dots'
  smallest operand) and a ring of at least one key block."""
  if num_kv_heads <= 0 or num_heads % num_kv_heads or head_dim % 2:
    return False
  g = num_heads // num_kv_heads
  rows_n = max(DECODE_ROWS, 1 << (g - 1).bit_length())
  return (g & (g - 1) == 0 and num_heads % rows_n == 0 and head_dim // 2 >= 16
          and ring_length >= (DECODE_BLOCK_K if block_k is None else block_k))


def decode_attend_and_write_rotary_pallas(qkv, cos, sin, cache_k, cache_v, cache_positions, q_positions, *,
                                          num_heads, window, scale=None, out_rows=None, splits=None, block_k=None,
                                          num_warps=4, num_stages=2, interpret=None):
  """``decode_attend_and_write_pallas`` from the attention layer's fused, unrotated projection: ``qkv [R >= B, (Hq +
  2 Hkv) D]`` (query heads, then key heads, then value heads; rows past B ignored) and the token's rotary
  ``cos, sin [B, D]`` (rotate-half convention, float32). Both kernels apply the rotary embedding to what they read
  (rounded to the cache's dtype, as a rotary before them would), so no XLA op sits between the projection and the
  kernels. Same results and returns as ``decode_attend_and_write_pallas`` on the split, rotated q, k, v; shapes must
  pass ``rotary_decode_supported``."""
  b, _, hkv, d = cache_k.shape
  hq = num_heads
  if qkv.ndim != 2 or qkv.shape[0] < b or qkv.shape[1] != (hq + 2 * hkv) * d:
    raise ValueError(f"qkv must be [R >= {b}, {(hq + 2 * hkv) * d}] for {hq} query and {hkv} key/value heads of "
                     f"{d}, got {qkv.shape}")
  if cos.shape != (b, d) or sin.shape != (b, d) or q_positions.shape != (b, 1):
    raise ValueError(f"cos, sin must be [{b}, {d}] and q_positions [{b}, 1], got {cos.shape}, {sin.shape}, "
                     f"{q_positions.shape}")
  block_k = DECODE_BLOCK_K if block_k is None else block_k
  if not rotary_decode_supported(hq, hkv, d, cache_k.shape[1], block_k):
    raise ValueError(f"decode_attend_and_write_rotary_pallas does not take Hq={hq}, Hkv={hkv}, D={d} with a ring of "
                     f"{cache_k.shape[1]} slots and {block_k}-slot blocks (rotary_decode_supported)")
  out_rows = b if out_rows is None else out_rows
  scale = d ** -0.5 if scale is None else scale
  g = hq // hkv
  rows_n = max(DECODE_ROWS, 1 << (g - 1).bit_length())
  qk_scale = scale * math.log2(math.e)
  heads = qkv.reshape(qkv.shape[0], hq + 2 * hkv, d)
  cos, sin = cos.astype(jnp.float32), sin.astype(jnp.float32)
  acc, m, l = _decode_partials(heads, cache_k, cache_v, cache_positions, q_positions, window=window,
                               qk_scale=qk_scale, hkv=hkv, splits=DECODE_SPLITS if splits is None else splits,
                               block_k=block_k, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                               rotary=(hq, cos, sin))
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  r_ = functools.partial(_program_row, hq=hq, b=b)
  head = lambda first: pl.BlockSpec((None, None, d), lambda n: (r_(n), first(n), 0))
  row = pl.BlockSpec((None, d), lambda n: (r_(n), 0))
  q_specs = [head(lambda n: n % hq), head(lambda n: hq + (n % hq) // g), head(lambda n: hq + hkv + (n % hq) // g),
             row, row]
  return _combine_and_write(acc, m, l, cache_k, cache_v, cache_positions, q_positions,
                            [heads, heads, heads, cos, sin], q_specs, b=b, hq=hq, hkv=hkv, qk_scale=qk_scale,
                            out_rows=out_rows, partial_row=lambda n: (n % hq) % rows_n, rotary=True,
                            num_warps=num_warps, interpret=interpret)
