"""Public chunked gated delta rule: layout handling, segment masks, custom VJP and backend dispatch.

Every backend runs the same four stages (see `xla.py`); the custom VJP recomputes the per-chunk states in the
backward pass instead of saving them, then runs a reverse pass for the state gradients and a chunk-parallel
pass for all input gradients. q/k L2-normalisation, the scale and the padding live outside the custom VJP, so
JAX differentiates them; the within-chunk cumulative sum of g is inside it (the gradient kernel returns dg
directly, which is more accurate than a reverse cumulative sum of the gradient w.r.t. the cumulative sum).
On GPU, "pallas_gpu" runs version 3 of the kernels: the backward's serial passes also store V' and dV', read by a
split chunk-parallel gradient kernel (`pallas_gpu.SPLIT_GRADS`), and with `pallas_gpu.NATIVE_LAYOUT` (the default)
the kernels read q, k, v and write O and all input gradients in the caller's [B, T, H, *] layout (`_run_native`):
q and k are normalised and scaled there first, by one Triton kernel (`qk_norm`; `KERNEL_L2NORM` moves that into
the chunk kernels instead). With NATIVE_LAYOUT off, `_prepare` transposes to the heads-first layout the other
backends use. Flags off select version 2 or 1 (`FUSED_PREP`).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from .. import _compat
from . import chunk_math as cm
from . import qk_norm, xla
from .naive import reset_mask

BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def _impl(backend):
  if backend == "xla":
    return xla
  return importlib.import_module(f".{backend}", __package__)


def supported(backend, K, V, chunk_size, dtype) -> bool:
  """Whether a Pallas backend handles these sizes (else "auto" falls back to "xla")."""
  if backend == "xla":
    return True
  ok = chunk_size == 64 and K % 16 == 0 and V % 16 == 0 and K <= 256 and V <= 256
  if backend == "pallas_gpu":  # Triton tensors must have power-of-two sizes
    dtypes = (jnp.bfloat16, jnp.float16)
    if _compat.gpu_interpret():
      # float32 operands run in interpret mode (CPU tests); compiled for an H100 at K=128, V=256 a float32 kernel
      # asked for 320 KB of shared memory (227 KB available), so "auto" sends float32 to the XLA backend.
      dtypes += (jnp.float32,)
    ok = ok and K & (K - 1) == 0 and V & (V - 1) == 0 and jnp.dtype(dtype) in dtypes
  return ok


def resolve_backend(backend, K, V, chunk_size, dtype) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    if not supported(backend, K, V, chunk_size, dtype):
      raise ValueError(f"{backend} does not support K={K}, V={V}, chunk_size={chunk_size}, {dtype}")
    return backend
  choice = "xla"
  if jax.devices()[0].platform == "tpu":
    choice = "pallas_tpu"
  elif _compat.sm80_gpu():
    choice = "pallas_gpu"
  return choice if supported(choice, K, V, chunk_size, dtype) else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(backend, C, q, k, v, g, beta, h0, m, seg):
  impl = _impl(backend)
  gam = cm.chunk_cumsum(g, C)
  if getattr(impl, "FUSED_PREP", False):
    pre = impl.prep(q, k, v, gam, beta, m, seg, chunk_size=C)
    o, hT, _ = impl.forward_pre(pre, h0, False, chunk_size=C)
    return o, hT
  w, u = impl.wu(k, v, gam, beta, m, seg, chunk_size=C)
  o, hT, _ = impl.forward(q, k, w, u, gam, m, seg, h0, False, chunk_size=C)
  return o, hT


def _core_fwd(backend, C, q, k, v, g, beta, h0, m, seg):
  out = _core(backend, C, q, k, v, g, beta, h0, m, seg)
  return out, (q, k, v, g, beta, h0, m, seg)


def _core_bwd(backend, C, res, cts):
  q, k, v, g, beta, h0, m, seg = res
  gam = cm.chunk_cumsum(g, C)
  do, dhT = cts
  impl = _impl(backend)
  do = do.astype(q.dtype)
  if getattr(impl, "FUSED_PREP", False) and getattr(impl, "SPLIT_GRADS", False):
    dq, dk, dv, dbeta, dg, dh0 = impl.backward_split(q, k, v, gam, beta, m, seg, h0, do, dhT.astype(jnp.float32),
                                                     chunk_size=C)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dh0,
            jnp.zeros_like(m), jnp.zeros_like(seg))
  if getattr(impl, "FUSED_PREP", False):
    pre = impl.prep(q, k, v, gam, beta, m, seg, chunk_size=C)
    _, _, h = impl.forward_pre(pre, h0, True, need_o=False, chunk_size=C)
    dh, dh0 = impl.backward_state_pre(pre, do, dhT.astype(jnp.float32), chunk_size=C)
    dq, dk, dv, dbeta, dg = impl.grads(q, k, v, gam, beta, m, seg, h, dh, do, chunk_size=C, a=pre["a"])
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dh0,
            jnp.zeros_like(m), jnp.zeros_like(seg))
  w, u = impl.wu(k, v, gam, beta, m, seg, chunk_size=C)
  _, _, h = impl.forward(q, k, w, u, gam, m, seg, h0, True, chunk_size=C)
  dh, dh0 = impl.backward_state(q, k, w, do, gam, m, seg, dhT.astype(jnp.float32), chunk_size=C)
  dq, dk, dv, dbeta, dg = impl.grads(q, k, v, gam, beta, m, seg, h, dh, do, chunk_size=C)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dbeta, dh0,
          jnp.zeros_like(m), jnp.zeros_like(seg))


_core.defvjp(_core_fwd, _core_bwd)


def _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, segment_ids, C):
  """[B,T,H,*] -> the kernels' [N=B*H, Tp, *] layout, Tp a multiple of C, plus the per-token gate columns."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  cdt = q.dtype
  Tp = -(-T // C) * C
  pad = Tp - T
  q, k = qk_norm.reference(q, k, scale, use_qk_l2norm)

  def heads_first(x):  # [B,T,H,*] -> [B*H, Tp, *]
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    x = jnp.swapaxes(x, 1, 2)
    return x.reshape(B * H, Tp, *x.shape[3:])

  q, k, v = heads_first(q), heads_first(k), heads_first(v.astype(cdt))
  # Padding tokens have g = 0 and beta = 0: they leave the state untouched.
  g = heads_first(g.astype(jnp.float32))
  beta = heads_first(beta.astype(jnp.float32))[..., None]
  m, seg = _segments(segment_ids, B, T, C)
  per_head = lambda x: jnp.broadcast_to(x.reshape(B, 1, Tp, 1), (B, H, Tp, 1)).reshape(B * H, Tp, 1)
  return q, k, v, g[..., None], beta, _h0(initial_state, B, H, K, V), per_head(m), per_head(seg)


def _segments(segment_ids, B, T, C):
  """m, seg [B, Tp, 1] float32: segment number (count of resets so far) and 1 where the chunk's entry state still
  reaches the token."""
  Tp = -(-T // C) * C
  rid = jnp.cumsum(reset_mask(segment_ids, B, T).astype(jnp.int32), axis=1)
  rid = jnp.pad(rid, ((0, 0), (0, Tp - T)), mode="edge").reshape(B, Tp // C, C)
  prev = jnp.concatenate([rid[:, :1, :1], rid[:, :-1, -1:]], axis=1)
  m = (rid == prev).astype(jnp.float32)
  return m.reshape(B, Tp, 1), rid.astype(jnp.float32).reshape(B, Tp, 1)


def _h0(initial_state, B, H, K, V):
  return (jnp.zeros((B * H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32).reshape(B * H, K, V))


# ---------------------------------------------------------------- the caller's [B, T, H, *] layout (pallas_gpu)

def _native(impl):
  return all(getattr(impl, n, False) for n in ("FUSED_PREP", "SPLIT_GRADS", "NATIVE_LAYOUT"))


def _kernel_gates(impl):
  return getattr(impl, "KERNEL_GATES", False)


def _gam_args(impl, g, C):
  """The gate argument of the native kernels: g itself when they sum it (`KERNEL_GATES`), else XLA's cumsum."""
  return (g, dict(cumsum=True)) if _kernel_gates(impl) else (cm.chunk_cumsum(g, C), {})


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _core_native(backend, C, scale, l2norm, q, k, v, g, beta, h0, m, seg):
  impl = _impl(backend)
  gam, kw = _gam_args(impl, g, C)
  return impl.forward_native(q, k, v, gam, beta, m, seg, h0, chunk_size=C, scale=scale, l2norm=l2norm, **kw)


def _core_native_fwd(backend, C, scale, l2norm, q, k, v, g, beta, h0, m, seg):
  return _core_native(backend, C, scale, l2norm, q, k, v, g, beta, h0, m, seg), (q, k, v, g, beta, h0, m, seg)


def _core_native_bwd(backend, C, scale, l2norm, res, cts):
  q, k, v, g, beta, h0, m, seg = res
  do, dhT = cts
  impl = _impl(backend)
  gam, kw = _gam_args(impl, g, C)
  dq, dk, dv, dbeta, dg, dh0 = impl.backward_native(
      q, k, v, gam, beta, m, seg, h0, do, dhT.astype(jnp.float32), chunk_size=C, scale=scale, l2norm=l2norm, **kw)
  zero = lambda x: None if x is None else jnp.zeros_like(x)
  return (dq, dk, dv, dg, dbeta.astype(beta.dtype), None if h0 is None else dh0, zero(m), zero(seg))


_core_native.defvjp(_core_native_fwd, _core_native_bwd)


def _run_native(backend, q, k, v, g, beta, scale, initial_state, use_qk_l2norm, segment_ids, C):
  """q, k, v, O and the input gradients stay in [B, T, H, *]; the kernels transpose, and normalise and scale q/k
  unless `KERNEL_L2NORM` is off (then `qk_norm` does, in this layout, and JAX differentiates it)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  Tp = -(-T // C) * C
  impl = _impl(backend)
  if not getattr(impl, "KERNEL_L2NORM", True):
    q, k = (qk_norm.normalise if getattr(impl, "QK_NORM_KERNEL", False) else qk_norm.reference)(
        q, k, scale, use_qk_l2norm)
    scale, use_qk_l2norm = None, False
  # Padding tokens (only when T % C != 0) have q = k = v = 0, g = 0, beta = 0: they leave the state untouched.
  pad = lambda x: x if Tp == T else jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
  # With KERNEL_GATES the kernels take beta in its own dtype and stand in for absent resets (with
  # KERNEL_ZERO_STATE also for an absent initial state).
  lean = _kernel_gates(impl)
  m, seg = (None, None) if lean and segment_ids is None else _segments(segment_ids, B, T, C)
  h0 = (None if lean and initial_state is None and getattr(impl, "KERNEL_ZERO_STATE", False)
        else _h0(initial_state, B, H, K, V))
  beta = beta if lean else beta.astype(jnp.float32)
  o, hT = _core_native(backend, C, None if scale is None else float(scale), bool(use_qk_l2norm), pad(q), pad(k), pad(v),
                       pad(g.astype(jnp.float32))[..., None], pad(beta)[..., None], h0, m, seg)
  return (o if Tp == T else o[:, :T]), hT


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm=True, segment_ids=None, chunk_size=64, backend="auto"):
  """Gated delta rule over a whole sequence, chunk-parallel (training and prefill).

  Args:
    q, k: [batch, seq, heads, K]; v: [batch, seq, heads, V] (bf16 or f32; the kernels' operand dtype is q's).
    g: [batch, seq, heads] log-decay (<= 0), computed in float32. beta: [batch, seq, heads] in (0, 1).
    scale: multiplies q; defaults to K ** -0.5.
    initial_state: [batch, heads, K, V] float32 or None (zeros).
    output_final_state: also return the state after the last token.
    use_qk_l2norm: normalise q and k per head as x * rsqrt(sum(x^2) + 1e-6) in float32 first.
    segment_ids: [batch, seq] int or None. Wherever segment_ids[t] != segment_ids[t-1] the state is reset to
      zero before token t (any position; used for packed documents and padding). Token 0 starts from
      initial_state.
    chunk_size: tokens per chunk (the Pallas kernels need 64). seq need not be a multiple of it.
    backend: "xla" (reference chunked form), "pallas_tpu" (Mosaic), "pallas_gpu" (Triton lowering) or "auto"
      (TPU -> pallas_tpu, GPU with compute capability >= 8.0 -> pallas_gpu, else xla; xla too for sizes a
      kernel does not support, and for float32 operands on a GPU).

  Per token: S <- exp(g_t) S; v' = beta_t (v_t - S^T k_t); S <- S + k_t v'^T; o_t = S^T (scale q_t), with the
  state S [K, V] kept in float32. Differentiable in q, k, v, g, beta and initial_state (custom VJP whose
  backward pass is itself made of kernels for the Pallas backends).

  Returns:
    o: [batch, seq, heads, V] in v.dtype; final_state: [batch, heads, K, V] float32, or None unless
    output_final_state.

  Note: the TPU kernels are checked in interpret mode and by lowering for TPU (`lower(lowering_platforms=
  ("tpu",))` producing `tpu_custom_call`); a lowering is not a TPU compilation, so Mosaic may still reject or
  mis-tile a kernel on real hardware.
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K ** -0.5 if scale is None else scale
  C = chunk_size
  backend = resolve_backend(backend, K, V, C, q.dtype)
  if (backend != "xla" and _native(_impl(backend))
      and (isinstance(scale, (int, float)) or not getattr(_impl(backend), "KERNEL_L2NORM", True))):
    o, hT = _run_native(backend, q, k, v, g, beta, scale, initial_state, use_qk_l2norm, segment_ids, C)
    return o, (hT.reshape(B, H, K, V) if output_final_state else None)
  args = _prepare(q, k, v, g, beta, scale, initial_state, use_qk_l2norm, segment_ids, C)
  o, hT = _core(backend, C, *args)
  o = o[:, :T].reshape(B, H, T, V).swapaxes(1, 2).astype(v.dtype)
  return o, (hT.reshape(B, H, K, V) if output_final_state else None)
