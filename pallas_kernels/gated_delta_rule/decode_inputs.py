"""The Gated DeltaNet layer's per-token inputs for one decode step, from its fused input projection.

A decode step of the layer (REFERENCE section 3) projects the token once (``in_proj``: q, k, v, output gate, a, b
side by side), then needs, per head: q, k and v through the depthwise causal short convolution (window W = 4, the
last W - 1 inputs held in the cache) and SiLU, and the gates g = -exp(A_log) softplus(a + dt_bias) (log-decay) and
beta = sigmoid(b). Written as XLA ops that is about ten small kernels per layer at batch 1 (the convolution split
over several fusions, the two gates, and a copy of each conv state that the in-place cache update forces); here it is
one Pallas Triton kernel, one program per (row, head), that also shifts the conv windows in place.

`decode_inputs_reference` is the same computation in plain JAX (and the definition the kernel is tested against);
`decode_inputs` picks the kernel or the reference.

Arguments (``N = 2 H K + 2 H V + 2 H`` in the order q, k, v, gate, a, b):
  proj [R, N]: the projection of the step's tokens, R >= B rows (rows past B are ignored: a one-row product may be
    computed as a padded two-row one);
  conv_q, conv_k [B, W - 1, H K], conv_v [B, W - 1, H V]: the previous inputs, oldest first;
  conv_w [W, 2 H K + H V]: the q, k and v convolution kernels side by side (tap W - 1 is the current token);
  A_log, dt_bias [H]; live [B] (bool or 0/1): 0 for a padding token, whose q/k/v inputs count as zeros.
Returns q, k [B, 1, H, K], v [B, 1, H, V] (proj's dtype), g, beta [B, 1, H] float32 and the new conv states
(same shapes and dtypes as given; the kernel updates them in place when they are donated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _compat

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
  """Plain-JAX definition (see the module docstring for arguments and results)."""
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


def supported(K, V, W) -> bool:
  """Head dims the kernel takes (Triton tensor sizes: powers of two), and v's column offset 2 H K a multiple of V."""
  return all(d & (d - 1) == 0 and 16 <= d <= 256 for d in (K, V)) and (2 * K) % V == 0 and W >= 2


def _kernel(qr_ref, kr_ref, vr_ref, a_ref, b_ref, cq_ref, ck_ref, cv_ref, wq_ref, wk_ref, wv_ref, alog_ref, dtb_ref,
            live_ref, q_ref, k_ref, v_ref, g_ref, beta_ref, cq_out, ck_out, cv_out, *, taps):
  f32 = jnp.float32
  keep = live_ref[...]  # [1] float32

  def conv(x_ref, c_ref, w_ref, o_ref, c_out):
    dtype = x_ref.dtype
    x = (x_ref[...].astype(f32) * keep).astype(dtype)
    # The window in the inputs' dtype (as the reference); every read of it precedes the in-place writes.
    prev = [c_ref[i, :].astype(dtype) for i in range(taps - 1)]
    y = prev[0].astype(f32) * w_ref[0, :].astype(f32)
    for i in range(1, taps - 1):
      y = y + prev[i].astype(f32) * w_ref[i, :].astype(f32)
    y = (y + x.astype(f32) * w_ref[taps - 1, :].astype(f32)).astype(dtype).astype(f32)
    o_ref[...] = (y * (1.0 / (1.0 + jnp.exp(-y)))).astype(o_ref.dtype)
    for i in range(taps - 2):
      c_out[i, :] = prev[i + 1].astype(c_out.dtype)
    c_out[taps - 2, :] = x.astype(c_out.dtype)

  conv(qr_ref, cq_ref, wq_ref, q_ref, cq_out)
  conv(kr_ref, ck_ref, wk_ref, k_ref, ck_out)
  conv(vr_ref, cv_ref, wv_ref, v_ref, cv_out)
  a = a_ref[...].astype(f32) + dtb_ref[...].astype(f32)
  softplus = jnp.maximum(a, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(a)))
  g_ref[...] = -jnp.exp(alog_ref[...].astype(f32)) * softplus
  beta_ref[...] = 1.0 / (1.0 + jnp.exp(-b_ref[...].astype(f32)))


def decode_inputs_gpu(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live, *, num_heads, head_k, head_v,
                      interpret=None):
  """One Pallas Triton kernel (grid B x H); the conv states are updated in place (aliased). Forward only."""
  B, H, K, V = conv_q.shape[0], num_heads, head_k, head_v
  taps = conv_w.shape[0]
  if not supported(K, V, taps):
    raise ValueError(f"decode_inputs_gpu does not support K={K}, V={V}, W={taps}")
  HK, HV = H * K, H * V
  interpret = _compat.gpu_interpret() if interpret is None else interpret
  f32 = jnp.float32
  row = lambda n: n // H
  head = lambda n: n % H
  seg = lambda size, first: pl.BlockSpec((None, size), lambda n: (row(n), first + head(n)))  # units of `size`
  one = lambda first: pl.BlockSpec((None, 1), lambda n: (row(n), first + head(n)))
  window = lambda size: pl.BlockSpec((None, taps - 1, size), lambda n: (row(n), 0, head(n)))
  weights = lambda size, first: pl.BlockSpec((taps, size), lambda n: (0, first + head(n)))
  per_head = pl.BlockSpec((None, 1), lambda n: (head(n), 0))
  per_row = pl.BlockSpec((None, 1), lambda n: (row(n), 0))
  out_vec = lambda size: pl.BlockSpec((None, size), lambda n: (n, 0))
  in_specs = [seg(K, 0), seg(K, H), seg(V, 2 * HK // V), one(2 * HK + 2 * HV), one(2 * HK + 2 * HV + H),
              window(K), window(K), window(V), weights(K, 0), weights(K, H), weights(V, 2 * HK // V),
              per_head, per_head, per_row]
  out_specs = [out_vec(K), out_vec(K), out_vec(V), out_vec(1), out_vec(1), window(K), window(K), window(V)]
  dt = proj.dtype
  out_shape = [jax.ShapeDtypeStruct((B * H, K), dt), jax.ShapeDtypeStruct((B * H, K), dt),
               jax.ShapeDtypeStruct((B * H, V), dt), jax.ShapeDtypeStruct((B * H, 1), f32),
               jax.ShapeDtypeStruct((B * H, 1), f32), jax.ShapeDtypeStruct(conv_q.shape, conv_q.dtype),
               jax.ShapeDtypeStruct(conv_k.shape, conv_k.dtype), jax.ShapeDtypeStruct(conv_v.shape, conv_v.dtype)]
  keep = live.reshape(B, 1).astype(f32)
  q, k, v, g, beta, cq, ck, cv = pl.pallas_call(
      functools.partial(_kernel, taps=taps), grid=(B * H,), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases={5: 5, 6: 6, 7: 7},
      compiler_params=_compat.triton_params(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
      name="gdn_decode_inputs",
  )(proj, proj, proj, proj, proj, conv_q, conv_k, conv_v, conv_w, conv_w, conv_w, A_log.reshape(H, 1),
    dt_bias.reshape(H, 1), keep)
  return (q.reshape(B, 1, H, K), k.reshape(B, 1, H, K), v.reshape(B, 1, H, V), g.reshape(B, 1, H),
          beta.reshape(B, 1, H), cq, ck, cv)


def resolve_backend(backend, K, V, W) -> str:
  """"pallas_gpu" asks for the kernel; "auto" takes it on a CUDA GPU of compute capability >= 8.0 where the dims
  fit; "xla" (and "pallas_tpu": no TPU kernel) is the reference."""
  if backend == "pallas_gpu":
    if not supported(K, V, W):
      raise ValueError(f"pallas_gpu decode_inputs does not support K={K}, V={V}, W={W}")
    return backend
  if backend == "auto" and supported(K, V, W):
    dev = jax.devices()[0]
    if dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0") or 0) >= 8.0:
      return "pallas_gpu"
  return "xla"


def decode_inputs(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live, *, num_heads, head_k, head_v,
                  backend="auto"):
  """The layer's decode-step inputs (module docstring) by ``backend``: "auto", "xla", "pallas_gpu" or
  "pallas_tpu" (the reference). Differentiable only through the reference ("xla")."""
  if backend not in BACKENDS + ("pallas_tpu",):
    raise ValueError(f"backend must be one of {BACKENDS + ('pallas_tpu',)}, got {backend!r}")
  B = conv_q.shape[0]
  N = 2 * num_heads * (head_k + head_v + 1)
  if proj.ndim != 2 or proj.shape[0] < B or proj.shape[1] != N:
    raise ValueError(f"proj must be [R >= {B}, {N}] (q, k, v, gate, a, b side by side), got {proj.shape}")
  kw = dict(num_heads=num_heads, head_k=head_k, head_v=head_v)
  if resolve_backend(backend, head_k, head_v, conv_w.shape[0]) == "pallas_gpu":
    return decode_inputs_gpu(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live, **kw)
  return decode_inputs_reference(proj, conv_q, conv_k, conv_v, conv_w, A_log, dt_bias, live, **kw)
