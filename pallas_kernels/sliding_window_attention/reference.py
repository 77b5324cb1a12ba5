"""Dense masked sliding-window attention: the oracle, and the "xla" backend.

Layout everywhere: ``q [batch, seq, q_heads, dim]``, ``k, v [batch, seq, kv_heads, dim]``.
GQA: query head ``h`` uses kv head ``h // (q_heads // kv_heads)``; K/V are never repeated,
the query heads are grouped as ``[batch, seq, kv_heads, group, dim]`` instead.

Visibility of key ``s`` from query ``t`` (causal, window ``W``, optional packing):
``s <= t and s > t - W and segment[s] == segment[t]``; ``W = None`` is full causal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def visible(q_pos, k_pos, window, q_seg=None, k_seg=None, *, inclusive=True):
  """Boolean mask ``[..., Tq, Tk]`` from positions ``q_pos [..., Tq]``, ``k_pos [..., Tk]``.

  A negative position marks an empty slot / padding and is never visible.
  ``inclusive=False`` excludes the key at the query's own position (cache slots).
  """
  qp = q_pos[..., :, None]
  kp = k_pos[..., None, :]
  m = (kp <= qp) if inclusive else (kp < qp)
  m &= (kp >= 0) & (qp >= 0)
  if window is not None:
    m &= kp > qp - window
  if q_seg is not None:
    m &= q_seg[..., :, None] == k_seg[..., None, :]
  return m


def masked_softmax_attention(q, k, v, mask, scale):
  """Core: ``q [B,Tq,Hkv,G,D]``, ``k,v [B,Tk,Hkv,D]``, ``mask`` broadcastable to ``[B,1,1,Tq,Tk]``.

  Softmax in float32. A row with no visible key gives zeros, not NaN.
  """
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no visible key
  p = jnp.exp(s - m)  # exp(-inf) = 0 on masked entries
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype) if v.dtype != jnp.float32 else p,
                 v, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  return o


def _check_shapes(q, k, v):
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    raise ValueError(f"expected q [B,T,Hq,D] and k, v [B,T,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or hq % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape} do not fit (Hq must be a multiple of Hkv)")


def attention_reference(q, k, v, *, window, segment_ids=None, scale=None):
  """Dense masked attention, O(T^2) memory: the oracle every kernel is tested against."""
  _check_shapes(q, k, v)
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  pos = jnp.arange(t, dtype=jnp.int32)
  if segment_ids is None:
    mask = visible(pos, pos, window)
  else:
    seg = segment_ids.astype(jnp.int32)
    mask = visible(pos, pos, window, seg, seg)[:, None, None]
  qg = q.reshape(b, t, hkv, hq // hkv, d)
  o = masked_softmax_attention(qg, k, v, mask, scale)
  return o.reshape(b, t, hq, d).astype(q.dtype)


def attention_blockwise(q, k, v, *, window, segment_ids=None, scale=None, block_q=512):
  """Linear-memory XLA path: each block of ``block_q`` queries attends to a fixed-size
  key slice ``[start - window + 1, start + block_q)``; blocks are rematerialised in the
  backward pass so memory stays O(T * (window + block_q)) per block, not O(T^2)."""
  _check_shapes(q, k, v)
  if window is None:
    return attention_reference(q, k, v, window=None, segment_ids=segment_ids, scale=scale)
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  nb = -(-t // block_q)
  tp = nb * block_q
  span = block_q + window - 1
  lead = window - 1
  seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
  # keys padded on the left by window-1 so every block's slice has the same size
  pad_k = lambda x: jnp.pad(x, ((0, 0), (lead, tp - t), (0, 0), (0, 0)))
  kp, vp = pad_k(k), pad_k(v)
  kpos = jnp.pad(jnp.arange(t, dtype=jnp.int32), (lead, tp - t), constant_values=-1)
  kseg = jnp.pad(seg, ((0, 0), (lead, tp - t)))
  qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, nb, block_q, hkv, g, d)
  qpos = jnp.arange(tp, dtype=jnp.int32).reshape(nb, block_q)
  qseg = jnp.pad(seg, ((0, 0), (0, tp - t))).reshape(b, nb, block_q)

  @jax.checkpoint
  def one_block(i, qb, qposb, qsegb):
    start = i * block_q  # in padded key coordinates the slice begins at start
    kb = lax.dynamic_slice_in_dim(kp, start, span, axis=1)
    vb = lax.dynamic_slice_in_dim(vp, start, span, axis=1)
    kposb = lax.dynamic_slice_in_dim(kpos, start, span)
    ksegb = lax.dynamic_slice_in_dim(kseg, start, span, axis=1)
    mask = visible(qposb, kposb, window, qsegb, ksegb)[:, None, None]
    return masked_softmax_attention(qb, kb, vb, mask, scale)

  def body(_, xs):
    i, qb, qposb, qsegb = xs
    return None, one_block(i, qb, qposb, qsegb)

  _, o = lax.scan(body, None, (jnp.arange(nb), jnp.moveaxis(qp, 1, 0), qpos,
                               jnp.moveaxis(qseg, 1, 0)))
  o = jnp.moveaxis(o, 0, 1).reshape(b, tp, hq, d)[:, :t]
  return o.astype(q.dtype)


def attention_xla(q, k, v, *, window, segment_ids=None, scale=None):
  """The "xla" backend: dense for short sequences, block-wise when the window is much
  shorter than the sequence (the dense score matrix would not fit)."""
  t = q.shape[1]
  if window is not None and t >= 4096 and t >= 2 * window:
    return attention_blockwise(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  return attention_reference(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
