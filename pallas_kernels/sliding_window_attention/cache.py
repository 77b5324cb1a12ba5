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

import jax.numpy as jnp

from pallas_kernels.sliding_window_attention.reference import masked_softmax_attention, visible


def attend_to_cache_reference(q, k, v, cache_k, cache_v, cache_positions, q_positions, *,
                              window, scale=None):
  """Pure-JAX oracle: one masked softmax over [cache slots | chunk keys]."""
  b, c, hq, d = q.shape
  hkv = k.shape[2]
  if hq % hkv or cache_k.shape[2] != hkv or cache_k.shape[3] != d:
    raise ValueError(f"shapes do not fit: q {q.shape}, k {k.shape}, cache_k {cache_k.shape}")
  scale = d ** -0.5 if scale is None else scale
  cache_positions = cache_positions.astype(jnp.int32)
  q_positions = q_positions.astype(jnp.int32)
  m_cache = visible(q_positions, cache_positions, window, inclusive=False)  # [B,C,L]
  m_chunk = visible(q_positions, q_positions, window, inclusive=True)      # [B,C,C]
  mask = jnp.concatenate([m_cache, m_chunk], axis=-1)[:, None, None]
  keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
  vals = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
  o = masked_softmax_attention(q.reshape(b, c, hkv, hq // hkv, d), keys, vals, mask, scale)
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
