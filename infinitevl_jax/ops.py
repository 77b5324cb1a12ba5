"""The one dispatch point for the token mixers (and the decode step's residual add + RMSNorm).

Model code calls ``gated_delta_rule``, ``attention``, ``attention_with_cache`` and ``add_rms_norm`` here; this module forwards to the
kernels in ``pallas_kernels`` with the backend chosen by ``use_backends`` (default ``"auto"``: each kernel package
picks by platform and falls back to its pure-JAX reference where no kernel can run).

Under a mesh (``jax.set_mesh``, see ``sharding``) every kernel runs inside ``shard_map``: batch split over
``dcn/data/fsdp``, heads over ``tensor``, so a kernel only ever sees one device's block and needs no collectives.
"""

from __future__ import annotations

import contextlib
import threading

import jax

from infinitevl_jax import sharding

_state = threading.local()
_DEFAULTS = {"gdn": "auto", "attention": "auto", "norm": "auto"}
GDN_BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "pallas_tpu", "pallas_gpu", "mosaic_gpu")
NORM_BACKENDS = ("auto", "xla", "pallas_gpu")


def _current() -> dict:
    if not hasattr(_state, "backends"):
        _state.backends = dict(_DEFAULTS)
    return _state.backends


def backend(op: str) -> str:
    return _current()[op]


@contextlib.contextmanager
def use_backends(*, gdn: str | None = None, attention: str | None = None, norm: str | None = None):
    """Selects kernel backends for everything traced inside the block, e.g. ``use_backends(gdn="xla")``."""
    chosen = {"gdn": (gdn, GDN_BACKENDS), "attention": (attention, ATTENTION_BACKENDS), "norm": (norm, NORM_BACKENDS)}
    for op, (name, allowed) in chosen.items():
        if name is not None and name not in allowed:
            raise ValueError(f"unknown {op} backend {name!r}; choose from {allowed}")
    saved = dict(_current())
    for op, (name, _) in chosen.items():
        if name is not None:
            _current()[op] = name
    try:
        yield
    finally:
        _state.backends = saved


def gated_delta_rule(q, k, v, g, beta, *, segment_ids=None, initial_state=None, output_final_state=False,
                     recurrent: bool = False):
    """Gated delta rule with q/k L2-norm inside. q,k ``[B,T,H,K]``, v ``[B,T,H,V]``, g/beta ``[B,T,H]``.

    ``recurrent=True`` uses the token-by-token form (decode, very short inputs); otherwise the chunked form.
    Returns ``(o [B,T,H,V], final_state [B,H,K,V] float32 | None)``.
    """
    from pallas_kernels import gated_delta_rule as gdr

    fn = gdr.fused_recurrent_gated_delta_rule if recurrent else gdr.chunk_gated_delta_rule
    chosen = backend("gdn")

    def kernel(q, k, v, g, beta, segment_ids, initial_state):
        o, state = fn(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                      use_qk_l2norm=True, segment_ids=segment_ids, backend=chosen)
        return (o, state) if output_final_state else o

    out = sharding.shard_over_batch_and_heads(
        kernel, (q, k, v, g, beta, segment_ids, initial_state), ("b.h.", "b.h.", "b.h.", "b.h", "b.h", "b.", "bh.."),
        ("b.h.", "bh..") if output_final_state else "b.h.", heads=q.shape[2])
    return out if output_final_state else (out, None)


def attention(q, k, v, *, window: int | None, segment_ids=None) -> jax.Array:
    """Causal GQA attention; each query sees itself and the previous ``window - 1`` tokens of its segment.

    q ``[B,T,Hq,D]``, k/v ``[B,T,Hkv,D]``; ``window=None`` is full causal attention (the teacher).
    """
    from pallas_kernels import sliding_window_attention as swa

    chosen = backend("attention")
    mesh = sharding.current_mesh()
    k, v = sharding.expand_kv_heads(k, q.shape[2], mesh), sharding.expand_kv_heads(v, q.shape[2], mesh)

    def kernel(q, k, v, segment_ids):
        return swa.sliding_window_attention(q, k, v, window=window, segment_ids=segment_ids, backend=chosen)

    return sharding.shard_over_batch_and_heads(kernel, (q, k, v, segment_ids), ("b.h.", "b.h.", "b.h.", "b."),
                                               "b.h.", heads=k.shape[2])


def attention_with_cache(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window: int | None) -> jax.Array:
    """A chunk of new queries against a ring buffer of past keys/values plus the chunk itself (decode: chunk of 1)."""
    from pallas_kernels import sliding_window_attention as swa

    chosen = backend("attention")
    mesh = sharding.current_mesh()
    k, v, cache_k, cache_v = (sharding.expand_kv_heads(x, q.shape[2], mesh) for x in (k, v, cache_k, cache_v))

    def kernel(q, k, v, cache_k, cache_v, cache_positions, q_positions):
        return swa.attend_to_cache(q, k, v, cache_k, cache_v, cache_positions, q_positions, window=window,
                                   backend=chosen)

    return sharding.shard_over_batch_and_heads(
        kernel, (q, k, v, cache_k, cache_v, cache_positions, q_positions),
        ("b.h.", "b.h.", "b.h.", "b.h.", "b.h.", "b.", "b."), "b.h.", heads=k.shape[2])


def _cache_backend() -> str:
    """The attention choice for the cache path: cuDNN and the Mosaic GPU kernels have none, so "cudnn" and
    "mosaic_gpu" mean "auto" there."""
    chosen = backend("attention")
    return "auto" if chosen in ("cudnn", "mosaic_gpu") else chosen


def attention_with_cache_update(q, k, v, cache_k, cache_v, cache_positions, q_positions, *, window: int | None,
                                out_rows: int | None = None):
    """``attention_with_cache`` and the ring-buffer write of the same chunk (decode on GPUs: one kernel pair that
    writes the ring in place). Returns ``(o [out_rows, C, Hq, D], cache_k, cache_v, cache_positions)``, rows of
    ``o`` past B zeros."""
    from pallas_kernels import sliding_window_attention as swa

    chosen = _cache_backend()
    # On a mesh of several devices: the two steps, the attention through ``attention_with_cache`` (per-device kernel
    # under shard_map), the write on the whole (sharded) ring.
    attend = None if sharding.current_mesh() is None else (
        lambda q, k, v, ck, cv, cp, qp, *, window, scale: attention_with_cache(q, k, v, ck, cv, cp, qp, window=window))
    return swa.attend_to_cache_and_write(q, k, v, cache_k, cache_v, cache_positions, q_positions, window=window,
                                         out_rows=out_rows, backend=chosen, attend=attend)


def rotary_decode_kernels(num_heads: int, num_kv_heads: int, head_dim: int, ring_length: int) -> bool:
    """Whether a one-token attention step takes ``attention_decode_rotary`` (the decode kernels reading the fused,
    unrotated projection): the cache path's choice is the GPU kernels, no mesh, and shapes the kernels take."""
    from pallas_kernels import sliding_window_attention as swa
    from pallas_kernels.sliding_window_attention import cache as swa_cache

    return (swa.decode_kernels_chosen(_cache_backend(), 1) and sharding.current_mesh() is None
            and swa_cache.rotary_decode_supported(num_heads, num_kv_heads, head_dim, ring_length))


def attention_decode_rotary(qkv, cos, sin, cache_k, cache_v, cache_positions, q_positions, *, num_heads: int,
                            window: int | None, out_rows: int | None = None):
    """One decode token per row from the fused projection ``qkv [R >= B, (Hq + 2 Hkv) D]`` and the rotary ``cos,
    sin [B, D]``: ``attention_with_cache_update`` of the rotated q, k and v, with the rotary embedding applied inside
    the two decode kernels (``decode_attend_and_write_rotary_pallas``; where ``rotary_decode_kernels`` holds).
    Returns ``(o [out_rows, 1, Hq, D], cache_k, cache_v, cache_positions)``."""
    from pallas_kernels.sliding_window_attention import cache as swa_cache

    o, *new = swa_cache.decode_attend_and_write_rotary_pallas(qkv, cos, sin, cache_k, cache_v, cache_positions,
                                                              q_positions, num_heads=num_heads, window=window,
                                                              out_rows=out_rows)
    return (o[:, None], *new)


def gdn_decode_mixer(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state, *, num_heads: int,
                     head_k: int, head_v: int, eps: float):
    """One decode step of a Gated DeltaNet layer between its projections, from the fused input projection
    ``proj [R >= B, N]`` to the o_proj input ``[R, H*V]`` (``pallas_kernels.gated_delta_rule.decode_mixer``;
    backend: the ``gdn`` choice). Returns ``(y, conv_q, conv_k, conv_v, state)``."""
    from pallas_kernels.gated_delta_rule import decode_mixer as dm

    chosen = backend("gdn")
    rows = "b." if proj.shape[0] == conv_q.shape[0] else ".."

    def kernel(*args):
        return dm.decode_mixer(*args, num_heads=num_heads, head_k=head_k, head_v=head_v, eps=eps, backend=chosen)

    return sharding.shard_over_batch_and_heads(
        kernel, (proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state),
        (rows, "b..", "b..", "b..", "..", ".", ".", ".", "b", "b..."),
        (rows, "b..", "b..", "b..", "b..."), heads=num_heads)


def add_rms_norm(x, delta, scale, eps: float):
    """``(x + delta, rms_norm(x + delta))``, the residual add and the norm after it (``pallas_kernels.rms_norm``;
    backend: the ``norm`` choice, whose "auto" takes the GPU kernel only for a decode step's few rows). Under a mesh
    the reference runs (XLA partitions it like any elementwise op and row reduction)."""
    from pallas_kernels import rms_norm

    chosen = backend("norm") if sharding.current_mesh() is None else "xla"
    return rms_norm.add_rms_norm(x, delta, scale, eps, backend=chosen)

