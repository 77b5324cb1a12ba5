"""Token-by-token gated delta rule for decode and very short inputs."""

from __future__ import annotations

from .naive import naive_recurrent_gated_delta_rule


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm=True, segment_ids=None,
                                     backend="auto"):
  """Gated delta rule as a recurrence over tokens (decode: T = 1 with the cache's state as initial_state).

  Same arguments, shapes and semantics as `chunk_gated_delta_rule` (without chunk_size): q, k [B, T, H, K],
  v [B, T, H, V], g, beta [B, T, H], initial_state [B, H, K, V] float32, segment_ids [B, T]; returns
  (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None).

  One step reads and writes the [K, V] float32 state once, so decode is bound by the state's bytes; XLA fuses
  the step into a few kernels, so every backend currently runs the same `lax.scan` (backend is accepted for
  signature parity with the chunked function). Differentiable by JAX autodiff.
  """
  del backend
  return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                          segment_ids=segment_ids)
