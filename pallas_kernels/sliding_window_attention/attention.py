"""Public entry points and the one place that chooses a backend.

``sliding_window_attention(q, k, v, *, window, segment_ids=None, scale=None, backend="auto")``
  ``q [B,T,Hq,D]``, ``k, v [B,T,Hkv,D]``; query ``t`` attends key ``s`` iff ``s <= t``,
  ``s > t - window`` and (packing) ``segment_ids[b, s] == segment_ids[b, t]``.
  ``window=None`` is full causal attention. ``scale`` defaults to ``D ** -0.5``; softmax in
  float32; output dtype is ``q.dtype``; differentiable.

Backends: ``"xla"`` (masked reference, block-wise for long sequences), ``"cudnn"``
(``jax.nn.dot_product_attention``; no segment ids), ``"pallas_gpu"`` (our Pallas/Triton flash
kernel that skips key blocks outside the window), ``"mosaic_gpu"`` (our warp-specialised Pallas
Mosaic GPU kernels for Hopper, forward and a five-product backward; no segment ids),
``"pallas_tpu"`` (JAX's splash attention with a causal local mask), ``"auto"`` (TPU -> splash;
NVIDIA sm80+ -> cuDNN when no segment ids (its forward+backward measured fastest on sm80+, level
with the Mosaic GPU kernels on Hopper), our Triton kernel for packed batches; otherwise xla).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _compat
from pallas_kernels.sliding_window_attention import cache as _cache
from pallas_kernels.sliding_window_attention import reference as _ref

BACKENDS = ("auto", "xla", "cudnn", "pallas_gpu", "mosaic_gpu", "pallas_tpu")


def choose_backend(*, segment_ids=None, window=None):
  """The backend ``"auto"`` resolves to on the default device."""
  del window
  if jax.devices()[0].platform == "tpu":
    return "pallas_tpu"
  if _compat.sm80_gpu():
    # Measured on an H100 (benchmarks/swa_kernel.py, BENCHMARKS.md): where it is allowed, cuDNN's windowed
    # kernel is ~1.25x faster than the Triton kernel forward and backward together, and level with the Mosaic GPU
    # kernels (0.97-1.01x), which run on Hopper only; it takes no segment ids, packed batches do.
    return "cudnn" if segment_ids is None else "pallas_gpu"
  return "xla"


def _cudnn(q, k, v, *, window, segment_ids, scale):
  if segment_ids is not None:
    raise ValueError(
        "backend='cudnn' cannot take segment_ids (cuDNN's windowed attention has no packing);"
        " use backend='pallas_gpu' or 'xla' for packed batches")
  d = q.shape[-1]
  return jax.nn.dot_product_attention(
      q, k, v, scale=d ** -0.5 if scale is None else scale, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")


def sliding_window_attention(q, k, v, *, window, segment_ids=None, scale=None, backend="auto"):
  """Causal (sliding-window) attention with GQA and optional packed segments. See module doc."""
  if window is not None and window < 1:
    raise ValueError(f"window must be >= 1 or None, got {window}")
  if backend == "auto":
    backend = choose_backend(segment_ids=segment_ids, window=window)
  if backend == "xla":
    return _ref.attention_xla(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  if backend == "cudnn":
    return _cudnn(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  if backend == "pallas_gpu":
    from pallas_kernels.sliding_window_attention import flash_gpu
    return flash_gpu.flash_attention(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  if backend == "mosaic_gpu":
    from pallas_kernels.sliding_window_attention import flash_mosaic
    return flash_mosaic.flash_attention(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  if backend == "pallas_tpu":
    from pallas_kernels.sliding_window_attention import splash_tpu
    return splash_tpu.splash_attention(q, k, v, window=window, segment_ids=segment_ids, scale=scale)
  raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# ``attend_to_cache``'s "auto" on sm80+ GPUs: chunks of at least this many queries (prefill) go to the Pallas chunk
# kernel; one query per row (decode) to the split-ring decode kernel (the chunk kernel, with only B*Hkv programs,
# lost to XLA there: 0.316 vs 0.128 ms at C=1, L=8191 on an H100); chunks in between to XLA's fused masked softmax.
PALLAS_CACHE_MIN_CHUNK = 64


def choose_cache_backend(chunk: int) -> str:
  """The backend ``attend_to_cache``'s ``"auto"`` resolves to for ``chunk`` queries per row on the default device."""
  if (chunk >= PALLAS_CACHE_MIN_CHUNK or chunk == 1) and _compat.sm80_gpu():
    return "pallas_gpu"  # one query per row: the split-ring decode kernel
  return "xla"  # also the TPU path: a chunk against <= window keys is one fused op


def decode_kernels_chosen(backend: str, chunk: int) -> bool:
  """Whether ``backend`` ("auto" resolved by ``choose_cache_backend``) puts a cache step of ``chunk`` queries per row
  on the GPU kernels."""
  return backend == "pallas_gpu" or backend == "auto" and choose_cache_backend(chunk) == "pallas_gpu"


def attend_to_cache(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window,
                    scale=None, backend="auto"):
  """Attention of a chunk ``q [B,C,Hq,D]`` (keys ``k, v [B,C,Hkv,D]``) against a ring-buffer
  cache ``cache_k, cache_v [B,L,Hkv,D]`` with slot positions ``cache_positions [B,L]`` (-1 empty)
  and query positions ``q_positions [B,C]`` (-1 padding). See ``cache.py`` for the rule.
  ``backend``: ``"auto"`` (``choose_cache_backend``), ``"xla"`` (``attend_to_cache_xla``: the reference's
  math without copying the cache) or ``"pallas_gpu"`` (one query per row: ``attend_to_cache_decode_pallas``,
  split along the ring; longer chunks: ``attend_to_cache_pallas``)."""
  if backend == "auto":
    backend = choose_cache_backend(q.shape[1])
  if backend == "pallas_gpu" and q.shape[1] == 1:
    return _cache.attend_to_cache_decode_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions,
                                                window=window, scale=scale)
  if backend == "pallas_gpu":
    return _cache.attend_to_cache_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions,
                                         window=window, scale=scale)
  if backend == "xla":
    return _cache.attend_to_cache_xla(q, k, v, cache_k, cache_v, cache_positions, q_positions,
                                      window=window, scale=scale)
  raise ValueError(f"unknown attend_to_cache backend {backend!r}; expected auto, xla, pallas_gpu")


ring_buffer_write = _cache.ring_buffer_write


def attend_to_cache_and_write(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window, scale=None,
                              out_rows=None, backend="auto", attend=None):
  """``attend_to_cache`` then ``ring_buffer_write`` for the same chunk: returns ``(o [out_rows, C, Hq, D], cache_k,
  cache_v, cache_positions)``, rows past B of ``o`` zeros (``out_rows`` default B). One query per row on the GPU
  kernels (``backend`` resolving to ``"pallas_gpu"``) is ``decode_attend_and_write_pallas``: the combine kernel
  writes the ring in place; otherwise the two steps, the write ordered after the read. ``attend``: a replacement for
  ``attend_to_cache`` (same arguments; e.g. one run under ``shard_map``), which always takes the two steps."""
  b, c = q.shape[:2]
  out_rows = b if out_rows is None else out_rows
  if out_rows < b:
    raise ValueError(f"out_rows ({out_rows}) must be at least the batch ({b})")
  if attend is None and c == 1 and decode_kernels_chosen(backend, c):
    o, *new = _cache.decode_attend_and_write_pallas(q, k, v, cache_k, cache_v, cache_positions, q_positions,
                                                     window=window, scale=scale, out_rows=out_rows)
    return (o[:, None], *new)
  attend = functools.partial(attend_to_cache, backend=backend) if attend is None else attend
  o = attend(q, k, v, cache_k, cache_v, cache_positions, q_positions, window=window, scale=scale)
  # The write updates the (donated) buffers in place: ordering it after the read spares XLA a defensive copy of the
  # whole ring buffer.
  o, cache_k, cache_v, cache_positions = jax.lax.optimization_barrier((o, cache_k, cache_v, cache_positions))
  new = ring_buffer_write(cache_k, cache_v, cache_positions, k, v, q_positions)
  return (jnp.pad(o, ((0, out_rows - b), (0, 0), (0, 0), (0, 0))), *new)
