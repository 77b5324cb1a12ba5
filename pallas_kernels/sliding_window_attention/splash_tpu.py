"""TPU backend: JAX's splash attention (Pallas/Mosaic TPU) with a causal local mask.

``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]``; splash takes head-major ``[H, T, D]`` per batch
element and handles GQA itself (``Hq // Hkv`` query heads per kv head, K/V not repeated).
The mask is static (``LocalMask`` with left size ``window - 1``, right size 0, or
``CausalMask`` for full attention), so splash skips every key block outside the window at
compile time; packed sequences use splash's segment ids. Splash does not scale the logits:
the scale is folded into q.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

# Blocks for the 4B shape (D=128, W=8192, T >= 8192): 512-query tiles against 1024-key
# tiles computed in 512-wide slices; the fused backward kernel computes dQ, dK, dV in one pass.
DEFAULT_BLOCKS = dict(block_q=512, block_kv=1024, block_kv_compute=512, block_q_dkv=512,
                      block_kv_dkv=1024, block_kv_dkv_compute=512)
_ALIGN = 128  # TPU lane width: the sequence is padded to a multiple of it


def _fit(block, t):
  """Largest divisor of ``t`` of the form ``block / 2**n`` that is >= 128 (t % 128 == 0)."""
  b = min(block, t)
  while t % b:
    b //= 2
  return max(b, math.gcd(t, _ALIGN))


@functools.lru_cache(maxsize=32)
def _kernel(t, window, q_heads, interpret, blocks):
  blocks = {k: _fit(v, t) for k, v in dict(blocks).items()}
  sizes = splash.BlockSizes(**blocks, use_fused_bwd_kernel=True)
  if window is None or window >= t:
    head = masks.CausalMask((t, t))
  else:
    head = masks.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  mask = masks.MultiHeadMask([head] * q_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def splash_attention(q, k, v, *, window, segment_ids=None, scale=None, interpret=False,
                     blocks=None):
  """Sliding-window causal attention through splash; same contract as the reference."""
  b, t, hq, d = q.shape
  if hq % k.shape[2]:
    raise ValueError(f"q heads {hq} must be a multiple of kv heads {k.shape[2]}")
  scale = d ** -0.5 if scale is None else scale
  tp = -(-t // _ALIGN) * _ALIGN
  if tp != t:  # padded keys lie after every real query: causality hides them
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - t)), constant_values=-1)
  kernel = _kernel(tp, window, hq, interpret, tuple(sorted((blocks or DEFAULT_BLOCKS).items())))
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
  qh = heads_first(q * jnp.asarray(scale, q.dtype))
  kh, vh = heads_first(k), heads_first(v)
  if segment_ids is None:
    o = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_))(qh, kh, vh)
  else:
    seg = segment_ids.astype(jnp.int32)
    o = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=splash.SegmentIds(s_, s_)))(
        qh, kh, vh, seg)
  return jnp.swapaxes(o, 1, 2)[:, :t].astype(q.dtype)
