"""Token-by-token gated delta rule for decode and very short inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import chunk, decode_gpu
from .naive import l2norm, naive_recurrent_gated_delta_rule


def decode_backend(backend, K, V, scale=None) -> str:
  """The implementation of one decode step: "pallas_gpu" (`decode_gpu`) or "xla" (`decode_step`).

  "pallas_gpu" asks for the kernel (ValueError for head dims it does not take). "auto" takes it where the chunked
  function's "auto" picks its GPU kernels (a CUDA GPU with compute capability >= 8.0; asked for bfloat16 operands,
  since the decode kernel's float32 work does not depend on the operand dtype) and the head dims fit. "xla" and
  "pallas_tpu" (no TPU decode kernel) run the XLA step, as does a traced (non-static) scale.
  """
  if backend not in chunk.BACKENDS:
    raise ValueError(f"backend must be one of {chunk.BACKENDS}, got {backend!r}")
  static_scale = not isinstance(scale, jax.core.Tracer)  # the kernel takes the scale as a constant
  if backend == "pallas_gpu":
    if not decode_gpu.supported(K, V):
      raise ValueError(f"pallas_gpu decode does not support K={K}, V={V}")
    return "pallas_gpu" if static_scale else "xla"
  if (backend == "auto" and static_scale and decode_gpu.supported(K, V)
      and chunk.resolve_backend("auto", K, V, 64, jnp.bfloat16) == "pallas_gpu"):
    return "pallas_gpu"
  return "xla"


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm=True, segment_ids=None,
                                     backend="auto"):
  """Gated delta rule as a recurrence over tokens (decode: T = 1 with the cache's state as initial_state).

  Same arguments, shapes and semantics as `chunk_gated_delta_rule` (without chunk_size): q, k [B, T, H, K],
  v [B, T, H, V], g, beta [B, T, H], initial_state [B, H, K, V] float32, segment_ids [B, T]; returns
  (o [B, T, H, V] in v.dtype, final_state [B, H, K, V] float32 or None).

  T = 1 (decode) with an initial state runs one Pallas Triton kernel (`decode_gpu.decode_step_gpu`: one read and
  one in-place write of the state) where `decode_backend` picks "pallas_gpu": backend "pallas_gpu", or "auto" on a
  CUDA GPU with compute capability >= 8.0. Otherwise T = 1 is the XLA `decode_step` (two passes over the [K, V]
  float32 state); "pallas_tpu" takes this XLA path too (no TPU decode kernel). Longer inputs run the float32
  `lax.scan` of the oracle on every backend. Differentiable in reverse mode (JAX autodiff; the kernel path through
  a custom VJP that differentiates the XLA `decode_step`, the kernel itself being forward only).
  """
  if q.shape[1] == 1:
    # One token: no segment reset can happen (a reset needs a previous token in the input).
    if initial_state is not None and decode_backend(backend, q.shape[-1], v.shape[-1], scale) == "pallas_gpu":
      o, s = decode_gpu.decode_step_gpu(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                        use_qk_l2norm=use_qk_l2norm)
      return o, (s if output_final_state else None)
    return decode_step(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
  return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                          segment_ids=segment_ids)


def decode_step(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                use_qk_l2norm=True):
  """One token (T = 1) of the gated delta rule, reading the state twice and writing it once.

  Per head, with S the [K, V] state and a = exp(g), the recurrence S1 = a S; v' = beta (v - S1^T k);
  S2 = S1 + k v'^T; o = S2^T q is rewritten around the two matvecs of the old state, kS = S^T k and qS = S^T q,
  computed together (one read of S):
    v' = beta (v - a kS),   o = a qS + (q . k) v',   S2 = a S + k v'^T   (one elementwise pass: read S, write S2).
  q and k are L2-normalised and q scaled exactly as in the token recurrence; float32 throughout.
  """
  B, T, H, K = q.shape
  if T != 1:
    raise ValueError(f"decode_step takes one token, got T = {T}")
  scale = K ** -0.5 if scale is None else scale
  f32 = jnp.float32
  q, k = (l2norm(q), l2norm(k)) if use_qk_l2norm else (q.astype(f32), k.astype(f32))
  q = q[:, 0] * scale  # [B, H, K]
  k = k[:, 0]
  vt = v[:, 0].astype(f32)  # [B, H, V]
  a = jnp.exp(g[:, 0].astype(f32))[..., None]  # [B, H, 1]
  bt = beta[:, 0].astype(f32)[..., None]
  if initial_state is None:
    vn = bt * vt
    s = k[..., :, None] * vn[..., None, :]
    o = jnp.sum(q * k, axis=-1, keepdims=True) * vn
  else:
    s0 = initial_state.astype(f32)
    kq = jnp.stack([k, q], axis=2)  # [B, H, 2, K]: both matvecs in one pass over the state
    ks, qs = jnp.moveaxis(jnp.einsum("bhik,bhkv->bhiv", kq, s0, precision="highest"), 2, 0)
    vn = bt * (vt - a * ks)
    o = a * qs + jnp.sum(q * k, axis=-1, keepdims=True) * vn
    s = a[..., None] * s0 + k[..., :, None] * vn[..., None, :]
  return o[:, None].astype(v.dtype), (s if output_final_state else None)
