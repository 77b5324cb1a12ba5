"""Sliding-window (and full causal) attention with GQA, packing and a ring-buffer cache."""

from pallas_kernels.sliding_window_attention.attention import (
    BACKENDS,
    PALLAS_CACHE_MIN_CHUNK,
    attend_to_cache,
    attend_to_cache_and_write,
    choose_backend,
    choose_cache_backend,
    decode_kernels_chosen,
    ring_buffer_write,
    sliding_window_attention,
)
from pallas_kernels.sliding_window_attention.cache import (
    attend_to_cache_reference,
    attend_to_cache_xla,
    init_ring_buffer,
)
from pallas_kernels.sliding_window_attention.reference import (
    attention_blockwise,
    attention_reference,
)

__all__ = [
    "BACKENDS",
    "PALLAS_CACHE_MIN_CHUNK",
    "attend_to_cache",
    "attend_to_cache_and_write",
    "attend_to_cache_reference",
    "attend_to_cache_xla",
    "attention_blockwise",
    "attention_reference",
    "choose_backend",
    "choose_cache_backend",
    "decode_kernels_chosen",
    "init_ring_buffer",
    "ring_buffer_write",
    "sliding_window_attention",
]
