"""Oracle: the gated delta rule as a float32 token-by-token recurrence (`lax.scan`).

Slow (T sequential steps) but obviously right; every other implementation is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array) -> jax.Array:
  """x * rsqrt(sum(x^2) + 1e-6) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def reset_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """[B, T] bool: True where the state is zeroed before token t (segment id changes; never at t = 0)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  seg = segment_ids
  return jnp.concatenate([jnp.zeros((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def naive_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                                     output_final_state=False, use_qk_l2norm=True, segment_ids=None):
  """Reference gated delta rule, one token at a time in float32.

  Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g (log-decay, <= 0), beta [B, T, H];
  initial_state [B, H, K, V]; segment_ids [B, T] (int). Returns (o [B, T, H, V] in v.dtype,
  final_state [B, H, K, V] float32 or None).

  Per token: S <- exp(g_t) S; v' = beta_t (v_t - S^T k_t); S <- S + k_t v'^T; o_t = S^T (scale q_t),
  with S zeroed before every token whose segment id differs from the previous token's.
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  scale = K ** -0.5 if scale is None else scale
  f32 = jnp.float32
  q, k = (l2norm(q), l2norm(k)) if use_qk_l2norm else (q.astype(f32), k.astype(f32))
  q = q * scale
  s0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
  reset = reset_mask(segment_ids, B, T)

  def step(s, xs):
    qt, kt, vt, gt, bt, rt = xs  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H], [B]
    s = jnp.where(rt[:, None, None, None], 0.0, s)
    s = s * jnp.exp(gt)[..., None, None]
    kv = jnp.einsum("bhk,bhkv->bhv", kt, s, precision="highest")
    vn = bt[..., None] * (vt - kv)
    s = s + kt[..., :, None] * vn[..., None, :]
    ot = jnp.einsum("bhk,bhkv->bhv", qt, s, precision="highest")
    return s, ot

  xs = (q, k, v.astype(f32), g.astype(f32), beta.astype(f32), reset)
  xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)
  s, o = jax.lax.scan(step, s0, xs)
  o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
  return o, (s if output_final_state else None)
