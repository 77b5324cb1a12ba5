"""The chunked gated delta rule in plain XLA: per-chunk algebra vmapped, `lax.scan` over the chunks.

This is the reference chunked form (and the fallback backend). It implements the same four stages as the
Pallas backends, on the flattened layout [N = B*H, Tp, ...] with Tp a multiple of the chunk size:
  wu(k, v, gam, beta, m, seg)                       -> w [N,Tp,K], u [N,Tp,V]       (chunk-parallel)
  forward(q, k, w, u, gam, m, seg, h0, store)       -> o [N,Tp,V] f32, hT [N,K,V], h [N,NT,K,V] | None
  backward_state(q, k, w, do, gam, m, seg, dhT)     -> dh [N,NT,K,V] (grad of each chunk's exit state), dh0
  grads(q, k, v, gam, beta, m, seg, h, dh, do)      -> dq, dk [N,Tp,K], dv [N,Tp,V], dbeta, dg [N,Tp,1]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from . import chunk_math as cm

# The blocked substitution of the kernels, not jax.scipy's solve_triangular: on CPU the latter is a LAPACK custom
# call that queues on a thread pool as large as the core count, and with several devices per host (sharded runs on
# forced CPU devices) every device thread can end up waiting on it at once.
_solve_inverse = cm.unit_lower_inverse


def _chunks(x, C):
  N, T = x.shape[:2]
  return x.reshape(N, T // C, C, *x.shape[2:])


def _unchunk(x):
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def wu(k, v, gam, beta, m, seg, *, chunk_size):
  f = lambda *a: cm.chunk_wu(*a, inverse=_solve_inverse)
  w, u = jax.vmap(jax.vmap(f))(*(_chunks(x, chunk_size) for x in (k, v, gam, beta, m, seg)))
  return _unchunk(w).astype(k.dtype), _unchunk(u).astype(k.dtype)


def forward(q, k, w, u, gam, m, seg, h0, store, *, chunk_size):
  xs = tuple(jnp.moveaxis(_chunks(x, chunk_size), 1, 0) for x in (q, k, w, u, gam, m, seg))
  step = jax.vmap(cm.chunk_forward)

  def body(S, x):
    o, S1 = step(*x, S)
    return S1, (o, S if store else None)

  hT, (o, h) = jax.lax.scan(body, h0, xs)
  o = _unchunk(jnp.moveaxis(o, 0, 1)).astype(q.dtype)
  return o, hT, (jnp.moveaxis(h, 0, 1) if store else None)


def backward_state(q, k, w, do, gam, m, seg, dhT, *, chunk_size):
  xs = tuple(jnp.moveaxis(_chunks(x, chunk_size), 1, 0) for x in (q, k, w, do, gam, m, seg))
  step = jax.vmap(cm.chunk_backward_state)

  def body(dS, x):
    return step(*x, dS), dS

  dh0, dh = jax.lax.scan(body, dhT, xs, reverse=True)
  return jnp.moveaxis(dh, 0, 1), dh0


def grads(q, k, v, gam, beta, m, seg, h, dh, do, *, chunk_size):
  def f(q, k, v, gam, beta, m, seg, S0, dS1, do):
    box = {}
    dq, dk, dbeta, dg = cm.chunk_backward(q, k, gam, beta, m, seg, lambda j: (v, S0, dS1, do),
                                            lambda j, dv: box.update(dv=dv), inverse=_solve_inverse)
    return dq, dk, box["dv"], dbeta, dg

  ch = lambda x: _chunks(x, chunk_size)
  out = jax.vmap(jax.vmap(f))(ch(q), ch(k), ch(v), ch(gam), ch(beta), ch(m), ch(seg), h, dh, ch(do))
  return tuple(_unchunk(x) for x in out)
