"""One-token gated delta rule update (decode) as a single Pallas GPU (Triton) kernel.

Per head, with S the [K, V] float32 state, a = exp(g), q and k L2-normalised and q scaled (as `decode_step`):
  kS = S^T k,  qS = S^T q,  v' = beta (v - a kS),  o = a qS + (q . k) v',  S2 = a S + k v'^T.
Every value column of S2 and o depends on S only through its own column, so the value columns split into
independent programs. Grid (B*H, V // BV): each program loads its [K, BV] state slice once, normalises q and k of
its head (K values each, recomputed by the V // BV programs of a head instead of a separate XLA pass and launch),
forms both matvecs as float32 column sums, writes its BV outputs and its new state slice. The state output aliases
the state input, so a donated state is updated in place (each program reads and writes only its own slice).

BV = 32: at InfiniteVL's decode shape (B=1, H=16, K=128, V=256) that is 128 programs, about one per SM of an H100
or H200 (132 SMs), every one issuing its whole 16 KB slice at once (the full 2 MB state in flight in one wave, the
kernel's time being then ~one memory latency plus 4 MB / bandwidth); each row of a slice is one 128-byte line.
BV = 64 would leave half the SMs idle at B = 1; BV = 16 gives two programs per SM at half-line rows.

Forward only in the kernel: `decode_step_gpu` has a custom VJP whose backward differentiates the XLA
`decode_step` (recomputing the forward in XLA); forward-mode differentiation (jvp) is not defined.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat
from .naive import L2NORM_EPS

BV = 32  # value columns per program
NUM_WARPS = 4


def supported(K, V) -> bool:
  """Head dims the kernel takes: multiples of 16 up to 256 and powers of two (Triton tensor sizes)."""
  return all(d % 16 == 0 and d <= 256 and d & (d - 1) == 0 for d in (K, V))


def l2norm_column(x):
  """A float32 [K, 1] column divided by its L2 norm (the oracle's epsilon), inside a kernel."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=0, keepdims=True) + L2NORM_EPS)


def update(s, q, k, v, a, beta):
  """The one-token update of a [K, BV] float32 state slice inside a kernel: q, k [K, 1] (normalised, q scaled),
  v [1, BV], a = exp(g) and beta [1, 1], all float32. Returns (o [1, BV], new slice)."""
  ks = jnp.sum(s * k, axis=0, keepdims=True)  # [1, BV]
  qs = jnp.sum(s * q, axis=0, keepdims=True)
  qk = jnp.sum(q * k, axis=0, keepdims=True)  # [1, 1]
  vn = beta * (v - a * ks)  # [1, BV]
  return a * qs + qk * vn, a * s + k * vn


def _decode_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, s_ref, o_ref, s_out_ref, *, scale, l2norm):
  f32 = jnp.float32
  q = q_ref[...].astype(f32)  # [K, 1]
  k = k_ref[...].astype(f32)  # [K, 1]
  if l2norm:
    q, k = l2norm_column(q), l2norm_column(k)
  o, s_new = update(s_ref[...], q * scale, k, v_ref[...].astype(f32), jnp.exp(g_ref[...].astype(f32)),
                    beta_ref[...].astype(f32))
  o_ref[...] = o.astype(o_ref.dtype)
  s_out_ref[...] = s_new


def _decode_call(q, k, v, g, beta, state, *, scale, l2norm, interpret):
  B, _, H, K = q.shape
  V = v.shape[-1]
  N = B * H
  bv = min(BV, V)
  # T = 1: every reshape below is a bitcast of the caller's arrays (no XLA pass).
  col = lambda x, d: x.reshape(N, d, 1)  # q, k as [K, 1] columns per head
  row = lambda x, d: x.reshape(N, 1, d)  # v, o as [1, V] rows per head
  whole = lambda d: pl.BlockSpec((None, d, 1), lambda n, j: (n, 0, 0))
  cols = pl.BlockSpec((None, 1, bv), lambda n, j: (n, 0, j))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  o, s = pl.pallas_call(
      functools.partial(_decode_kernel, scale=scale, l2norm=l2norm), grid=(N, V // bv),
      in_specs=[whole(K), whole(K), cols, whole(1), whole(1), st],
      out_specs=[cols, st],
      out_shape=[jax.ShapeDtypeStruct((N, 1, V), v.dtype), jax.ShapeDtypeStruct((N, K, V), jnp.float32)],
      input_output_aliases={5: 1},
      compiler_params=_compat.triton_params(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
      name="gdn_decode",
  )(col(q, K), col(k, K), row(v, V), col(g, 1), col(beta, 1), state.astype(jnp.float32).reshape(N, K, V))
  return o.reshape(B, 1, H, V), s.reshape(B, H, K, V)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _decode(q, k, v, g, beta, state, scale, l2norm, interpret):
  return _decode_call(q, k, v, g, beta, state, scale=scale, l2norm=l2norm, interpret=interpret)


def _decode_fwd(q, k, v, g, beta, state, scale, l2norm, interpret):
  return _decode(q, k, v, g, beta, state, scale, l2norm, interpret), (q, k, v, g, beta, state)


def _decode_bwd(scale, l2norm, interpret, res, cts):
  from .fused_recurrent import decode_step
  del interpret

  def xla_step(q, k, v, g, beta, state):
    return decode_step(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True,
                       use_qk_l2norm=l2norm)

  _, vjp = jax.vjp(xla_step, *res)
  return vjp(cts)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_step_gpu(q, k, v, g, beta, *, scale=None, initial_state, use_qk_l2norm=True, interpret=None):
  """`fused_recurrent.decode_step` with an initial state, as one Pallas Triton kernel.

  q, k [B, 1, H, K], v [B, 1, H, V], g, beta [B, 1, H] (any float dtypes), initial_state [B, H, K, V] (cast to
  float32); K and V as `supported`. Returns (o [B, 1, H, V] in v.dtype, new_state [B, H, K, V] float32). The new
  state aliases the (float32) initial state: donate it to update in place. Float32 math throughout.
  `interpret`: None runs compiled on a GPU and interpreted elsewhere (as the other GPU kernels).
  Differentiable in reverse mode through the XLA `decode_step` (the kernel itself is forward only).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  if T != 1:
    raise ValueError(f"decode_step_gpu takes one token, got T = {T}")
  if not supported(K, V):
    raise ValueError(f"decode_step_gpu does not support K={K}, V={V}")
  scale = K ** -0.5 if scale is None else scale
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  return _decode(q, k, v, g, beta, initial_state, float(scale), bool(use_qk_l2norm), interpret)
