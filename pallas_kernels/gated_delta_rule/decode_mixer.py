"""The Gated DeltaNet layer's token mixer for one decode step, between its two projections.

A decode step of the layer (REFERENCE section 3) projects the token once (``in_proj``: q, k, v, output gate, a, b
side by side), then per head: q, k and v through the depthwise causal short convolution (window W = 4, the last
W - 1 inputs held in the cache) and SiLU; the gates g = -exp(A_log) softplus(a + dt_bias) (log-decay) and
beta = sigmoid(b); the one-token gated delta rule update of the [K, V] float32 state (q, k L2-normalised, q scaled);
then the output's per-head RMSNorm times SiLU(gate), which feeds ``o_proj``. As XLA ops at batch 1 that is about
fifteen small kernels per layer (the convolution split over several fusions, the gates, copies of the conv windows
that the in-place cache update forces, two passes over the state, the norm, the row padding of the next product).

Here it is two Pallas Triton kernels:
  1. grid (B H, V / BV): every program convolves its head's q and k (all K columns; reading the old windows only)
     and its BV columns of v (shifting that slice of the v window in place), forms the gates, and updates its
     [K, BV] slice of the state in place (one read, one write), writing BV outputs;
  2. grid (R H,): per head, the RMSNorm of the V outputs times SiLU(gate) into row b of the o_proj input [R, H V]
     (rows past B written as zeros, so a one-row product can run as two rows), and the in-place shift of the head's
     q and k windows, which kernel 1's programs of that head all read first.

`decode_inputs_reference` and `decode_mixer_reference` are the same computations in plain JAX (the definitions the
kernels are tested against); `decode_mixer` picks the kernels or the reference.

Arguments (``N = 2 H K + 2 H V + 2 H`` in the order q, k, v, gate, a, b):
  proj [R, N]: the projection of the step's tokens, R >= B rows (rows past B are ignored: a one-row product may be
    computed as a padded two-row one);
  conv_q, conv_k [B, W - 1, H K], conv_v [B, W - 1, H V]: the previous inputs, oldest first;
  conv_w [W, 2 H K + H V]: the q, k and v convolution kernels side by side (tap W - 1 is the current token);
  A_log, dt_bias [H]; o_norm [V]; live [B] (bool or 0/1): 0 for a padding token, whose q/k/v inputs count as zeros;
  state [B, H, K, V] float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat
from . import chunk, decode_gpu
from .fused_recurrent import decode_step

BV = 32  # value columns per program of kernel 1 (as decode_gpu: ~one program per SM at B = 1, H = 16, V = 256)
NUM_WARPS = 4
BACKENDS = ("auto", "xla", "pallas_gpu")


def _split(proj, B, H, K, V):
  HK, HV = H * K, H * V
  p = proj[:B]
  return p[:, :HK], p[:, HK:2 * HK], p[:, 2 * HK:2 * HK + HV], p[:, 2 * HK + 2 * HV:2 * HK + 2 * HV + H], \
      p[:, 2 * HK + 2 * HV + H:]


def _gates(a, b, A_log, dt_bias):
  f32 = jnp.float32
  g = -jnp.exp(A_log.astype(f32)) * jax.nn.softplus(a.astype(f32) + dt_bias.astype(f32))
  return g, jax.nn.sigmoid(b.astype(f32))


def decode_inputs_reference(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live, *, num_heads, head_k,
                            head_v):
  """The recurrence's inputs: q, k [B, 1, H, K], v [B, 1, H, V] (proj's dtype), g, beta [B, 1, H] float32 and the
  shifted conv windows (arguments as the module docstring)."""
  B, H, K, V = conv_q.shape[0], num_heads, head_k, head_v
  HK = H * K
  f32 = jnp.float32
  qr, kr, vr, a, b = _split(proj, B, H, K, V)
  keep = live.reshape(B, 1).astype(proj.dtype)

  def conv(x, state, w):  # x [B, C], state [B, W-1, C], w [W, C]
    x = x * keep
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # [B, W, C]
    y = jnp.zeros(x.shape, f32)
    for i in range(w.shape[0]):
      y = y + window[:, i].astype(f32) * w[i].astype(f32)
    return jax.nn.silu(y.astype(x.dtype)), window[:, 1:].astype(state.dtype)

  q, cq = conv(qr, conv_q, conv_w[:, :HK])
  k, ck = conv(kr, conv_k, conv_w[:, HK:2 * HK])
  v, cv = conv(vr, conv_v, conv_w[:, 2 * HK:])
  g, beta = _gates(a, b, A_log, dt_bias)
  return (q.reshape(B, 1, H, K), k.reshape(B, 1, H, K), v.reshape(B, 1, H, V), g[:, None], beta[:, None],
          cq, ck, cv)


def decode_mixer_reference(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state, *, num_heads,
                           head_k, head_v, eps, scale=None):
  """Plain-JAX definition. Returns (y [R, H V] in proj's dtype: the o_proj input, rows past B zeros; the new conv
  windows; the new state [B, H, K, V] float32)."""
  B, H, V = conv_q.shape[0], num_heads, head_v
  HK, HV = H * head_k, H * V
  q, k, v, g, beta, cq, ck, cv = decode_inputs_reference(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live,
                                                         num_heads=H, head_k=head_k, head_v=V)
  o, s = decode_step(q, k, v, g, beta, scale=scale, initial_state=state.astype(jnp.float32), output_final_state=True,
                     use_qk_l2norm=True)
  f32 = jnp.float32
  o = o[:, 0].astype(f32)  # [B, H, V]
  o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + eps) * o_norm.astype(f32)
  gate = proj[:B, 2 * HK + HV:2 * HK + 2 * HV].astype(f32).reshape(B, H, V)
  y = (o * jax.nn.silu(gate)).reshape(B, HV).astype(proj.dtype)
  y = jnp.pad(y, ((0, proj.shape[0] - B), (0, 0)))
  return y, cq, ck, cv, s


def supported(K, V, W) -> bool:
  """Head dims the kernels take (Triton tensor sizes: powers of two), with the column offsets of v and of the gate
  (2 H K, 2 H K + H V) multiples of V."""
  return all(d & (d - 1) == 0 and 16 <= d <= 256 for d in (K, V)) and (2 * K) % V == 0 and W >= 2


def _conv_silu(x_ref, c_ref, w_ref, keep, taps):
  """(masked input in its dtype, SiLU(conv) rounded to that dtype, as float32) for one window slice."""
  f32 = jnp.float32
  dtype = x_ref.dtype
  x = (x_ref[...].astype(f32) * keep).astype(dtype)
  prev = [c_ref[i, :].astype(dtype) for i in range(taps - 1)]  # the window in the inputs' dtype (as the reference)
  y = prev[0].astype(f32) * w_ref[0, :].astype(f32)
  for i in range(1, taps - 1):
    y = y + prev[i].astype(f32) * w_ref[i, :].astype(f32)
  y = (y + x.astype(f32) * w_ref[taps - 1, :].astype(f32)).astype(dtype).astype(f32)
  return x, prev, (y * (1.0 / (1.0 + jnp.exp(-y)))).astype(dtype).astype(f32)


def _shift(c_out, prev, x, taps):
  for i in range(taps - 2):
    c_out[i, :] = prev[i + 1].astype(c_out.dtype)
  c_out[taps - 2, :] = x.astype(c_out.dtype)


def _mix_kernel(qr_ref, kr_ref, vr_ref, a_ref, b_ref, cq_ref, ck_ref, cv_ref, wq_ref, wk_ref, wv_ref, alog_ref, dtb_ref,
                live_ref, s_ref, o_ref, cv_out, s_out, *, taps, scale):
  f32 = jnp.float32
  s = s_ref[...]  # [K, BV] float32, loaded first: its latency overlaps the convolutions below
  keep = live_ref[...]  # [1]
  _, _, q = _conv_silu(qr_ref, cq_ref, wq_ref, keep, taps)  # [K]
  _, _, k = _conv_silu(kr_ref, ck_ref, wk_ref, keep, taps)
  xv, prev_v, v = _conv_silu(vr_ref, cv_ref, wv_ref, keep, taps)  # [BV]
  _shift(cv_out, prev_v, xv, taps)  # this program's own slice of the v window
  a = a_ref[...].astype(f32) + dtb_ref[...].astype(f32)  # [1]
  g = -jnp.exp(alog_ref[...].astype(f32)) * (jnp.maximum(a, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(a))))
  beta = (1.0 / (1.0 + jnp.exp(-b_ref[...].astype(f32))))[:, None]
  o, s_new = decode_gpu.update(s, decode_gpu.l2norm_column(q[:, None]) * scale, decode_gpu.l2norm_column(k[:, None]),
                               v[None, :], jnp.exp(g)[:, None], beta)
  o_ref[...] = o.astype(o_ref.dtype)  # [1, BV]
  s_out[...] = s_new


def _out_kernel(o_ref, gate_ref, qr_ref, kr_ref, cq_ref, ck_ref, w_ref, live_ref, y_ref, cq_out, ck_out, *, taps, eps,
                rows, heads):
  f32 = jnp.float32
  real = pl.program_id(0) // heads < rows

  @pl.when(real)
  def _():
    o = o_ref[...].astype(f32)  # [V]
    o = o * jax.lax.rsqrt(jnp.mean(o * o) + eps) * w_ref[...].astype(f32)
    gate = gate_ref[...].astype(f32)
    y_ref[...] = (o * (gate * (1.0 / (1.0 + jnp.exp(-gate))))).astype(y_ref.dtype)
    keep = live_ref[...]
    for x_ref, c_ref, c_out in ((qr_ref, cq_ref, cq_out), (kr_ref, ck_ref, ck_out)):
      dtype = x_ref.dtype
      x = (x_ref[...].astype(f32) * keep).astype(dtype)
      _shift(c_out, [c_ref[i, :].astype(dtype) for i in range(taps - 1)], x, taps)

  @pl.when(jnp.logical_not(real))
  def _():
    y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)


def decode_mixer_gpu(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state, *, num_heads, head_k,
                     head_v, eps, scale=None, interpret=None):
  """Two Pallas Triton kernels (module docstring); the conv windows and the state are updated in place (aliased).
  Same results as `decode_mixer_reference`. Forward only."""
  B, H, K, V = conv_q.shape[0], num_heads, head_k, head_v
  R = proj.shape[0]
  taps = conv_w.shape[0]
  if not supported(K, V, taps):
    raise ValueError(f"decode_mixer_gpu does not support K={K}, V={V}, W={taps}")
  HK, HV = H * K, H * V
  bv = min(BV, V)
  nv = V // bv
  scale = K ** -0.5 if scale is None else scale
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  f32 = jnp.float32
  params = _compat.triton_params(num_warps=NUM_WARPS, num_stages=1)
  keep = live.reshape(B, 1).astype(f32)

  # kernel 1: grid (B H, V / bv); n = b H + h
  row, head = (lambda n, j: n // H), (lambda n, j: n % H)
  seg = lambda size, first: pl.BlockSpec((None, size), lambda n, j: (row(n, j), first + head(n, j)))
  vseg = lambda first: pl.BlockSpec((None, bv), lambda n, j: (row(n, j), first + head(n, j) * nv + j))
  window = pl.BlockSpec((None, taps - 1, K), lambda n, j: (row(n, j), 0, head(n, j)))
  vwindow = pl.BlockSpec((None, taps - 1, bv), lambda n, j: (row(n, j), 0, head(n, j) * nv + j))
  weights = lambda first: pl.BlockSpec((taps, K), lambda n, j: (0, first + head(n, j)))
  vweights = pl.BlockSpec((taps, bv), lambda n, j: (0, 2 * HK // bv + head(n, j) * nv + j))
  per_head = pl.BlockSpec((None, 1), lambda n, j: (head(n, j), 0))
  per_row = pl.BlockSpec((None, 1), lambda n, j: (row(n, j), 0))
  st = pl.BlockSpec((None, K, bv), lambda n, j: (n, 0, j))
  o, cv, s = pl.pallas_call(
      functools.partial(_mix_kernel, taps=taps, scale=float(scale)), grid=(B * H, nv),
      in_specs=[seg(K, 0), seg(K, H), vseg(2 * HK // bv), seg(1, 2 * HK + 2 * HV), seg(1, 2 * HK + 2 * HV + H),
                window, window, vwindow, weights(0), weights(H), vweights, per_head, per_head, per_row, st],
      out_specs=[pl.BlockSpec((None, 1, bv), lambda n, j: (n, 0, j)), vwindow, st],
      out_shape=[jax.ShapeDtypeStruct((B * H, 1, V), proj.dtype), jax.ShapeDtypeStruct(conv_v.shape, conv_v.dtype),
                 jax.ShapeDtypeStruct((B * H, K, V), f32)],
      input_output_aliases={7: 1, 14: 2}, compiler_params=params, interpret=interpret, name="gdn_decode_mix",
  )(proj, proj, proj, proj, proj, conv_q, conv_k, conv_v, conv_w, conv_w, conv_w, A_log.reshape(H, 1),
    dt_bias.reshape(H, 1), keep, state.astype(f32).reshape(B * H, K, V))

  # kernel 2: grid (R H,); rows past B write zeros (their inputs' block indices are clamped to real rows)
  real_n = lambda n: jnp.minimum(n, B * H - 1)
  real_row = lambda n: jnp.minimum(n // H, B - 1)
  window2 = pl.BlockSpec((None, taps - 1, K), lambda n: (real_row(n), 0, n % H))
  y, cq, ck = pl.pallas_call(
      functools.partial(_out_kernel, taps=taps, eps=float(eps), rows=B, heads=H), grid=(R * H,),
      in_specs=[pl.BlockSpec((None, None, V), lambda n: (real_n(n), 0, 0)),
                pl.BlockSpec((None, V), lambda n: (real_row(n), (2 * HK + HV) // V + n % H)),
                pl.BlockSpec((None, K), lambda n: (real_row(n), n % H)),
                pl.BlockSpec((None, K), lambda n: (real_row(n), H + n % H)),
                window2, window2, pl.BlockSpec((None, V), lambda n: (0, 0)),
                pl.BlockSpec((None, 1), lambda n: (real_row(n), 0))],
      out_specs=[pl.BlockSpec((None, V), lambda n: (n // H, n % H)), window2, window2],
      out_shape=[jax.ShapeDtypeStruct((R, HV), proj.dtype), jax.ShapeDtypeStruct(conv_q.shape, conv_q.dtype),
                 jax.ShapeDtypeStruct(conv_k.shape, conv_k.dtype)],
      input_output_aliases={4: 1, 5: 2}, compiler_params=params, interpret=interpret, name="gdn_decode_out",
  )(o, proj, proj, proj, conv_q, conv_k, o_norm.reshape(1, V), keep)
  return y, cq, ck, cv, s.reshape(B, H, K, V)


def resolve_backend(backend, K, V, W) -> str:
  """"pallas_gpu" asks for the kernels; "auto" takes them where the chunked function's "auto" picks its GPU kernels
  (a CUDA GPU of compute capability >= 8.0) and the dims fit; "xla" (and "pallas_tpu": no TPU kernel) is the
  reference."""
  if backend == "pallas_gpu":
    if not supported(K, V, W):
      raise ValueError(f"pallas_gpu decode_mixer does not support K={K}, V={V}, W={W}")
    return backend
  if (backend == "auto" and supported(K, V, W)
      and chunk.resolve_backend("auto", K, V, 64, jnp.bfloat16) == "pallas_gpu"):
    return "pallas_gpu"
  return "xla"


def decode_mixer(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state, *, num_heads, head_k,
                 head_v, eps, scale=None, backend="auto"):
  """One decode step of the token mixer (module docstring) by ``backend``: "auto", "xla", "pallas_gpu" or
  "pallas_tpu" (the reference). Returns ``(y [R, H V], conv_q, conv_k, conv_v, state)``: the o_proj input (rows
  past B zeros) in proj's dtype, the shifted conv windows, the new float32 state. Differentiable only through the
  reference ("xla")."""
  if backend not in BACKENDS + ("pallas_tpu",):
    raise ValueError(f"backend must be one of {BACKENDS + ('pallas_tpu',)}, got {backend!r}")
  B = conv_q.shape[0]
  N = 2 * num_heads * (head_k + head_v + 1)
  if proj.ndim != 2 or proj.shape[0] < B or proj.shape[1] != N:
    raise ValueError(f"proj must be [R >= {B}, {N}] (q, k, v, gate, a, b side by side), got {proj.shape}")
  if state.shape != (B, num_heads, head_k, head_v):
    raise ValueError(f"state must be [{B}, {num_heads}, {head_k}, {head_v}], got {state.shape}")
  kw = dict(num_heads=num_heads, head_k=head_k, head_v=head_v, eps=eps, scale=scale)
  args = (proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, o_norm, live, state)
  if resolve_backend(backend, head_k, head_v, conv_w.shape[0]) == "pallas_gpu":
    return decode_mixer_gpu(*args, **kw)
  return decode_mixer_reference(*args, **kw)
