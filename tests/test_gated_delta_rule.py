"""Gated delta rule: every backend against the float32 token recurrence (norm-relative errors).

The default run is a small covering subset; `-m slow` runs the full grid of issue 4
(T in {1, 63, 64, 65, 300} x initial state x segment resets x gate regimes, forward and gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                             naive_recurrent_gated_delta_rule)

ARGNAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(seed, B, T, H, K, V, *, gate="mixed", resets=True, init=True, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  a = jax.random.normal(ks[3], (B, T, H))
  g = {"near0": -0.01 * jax.nn.sigmoid(a), "strong": -2.0 - 3.0 * jax.nn.sigmoid(a),
       "mixed": -jax.nn.softplus(a)}[gate]
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  h0 = jax.random.normal(ks[5], (B, H, K, V)) if init else None
  seg = None
  if resets:  # several resets per 64-token chunk, at arbitrary positions, and one at t = 1
    r = (jax.random.uniform(ks[6], (B, T)) < 0.06).at[:, min(1, T - 1)].set(True)
    seg = jnp.cumsum(r, axis=1).astype(jnp.int32)
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), g=g.astype(jnp.float32), beta=cast(beta),
              initial_state=h0, segment_ids=seg)


def run(fn, x, **kw):
  return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
            segment_ids=x["segment_ids"], **kw)


def check_forward(backend, x, tol, **kw):
  o, s = jax.jit(functools.partial(run, chunk_gated_delta_rule, backend=backend, **kw))(x)
  f32 = {n: (a.astype(jnp.float32) if a is not None and n != "segment_ids" else a) for n, a in x.items()}
  o_ref, s_ref = run(naive_recurrent_gated_delta_rule, f32)
  assert o.shape == o_ref.shape and o.dtype == x["v"].dtype
  assert rel(o, o_ref) <= tol, rel(o, o_ref)
  assert rel(s, s_ref) <= tol, rel(s, s_ref)


def check_grads(backend, x, tol=1e-4, **kw):
  names = [n for n in ARGNAMES if x[n] is not None]

  def loss(fn, *args):
    y = dict(x, **dict(zip(names, args)))
    o, s = run(fn, y, **kw)
    # non-trivial cotangents on both outputs
    return jnp.sum(o * jnp.sin(o + 1.0)) + jnp.sum(s * jnp.cos(s))

  args = [x[n] for n in names]
  got = jax.jit(jax.grad(functools.partial(loss, functools.partial(chunk_gated_delta_rule, backend=backend)),
                         argnums=tuple(range(len(args)))))(*args)
  want = jax.grad(functools.partial(loss, naive_recurrent_gated_delta_rule), argnums=tuple(range(len(args))))(*args)
  for n, a, b in zip(names, got, want):
    assert rel(a, b) <= tol, (n, rel(a, b))


# ---------------------------------------------------------------- default (CI) subset

def test_xla_forward_and_grads():
  x = make_inputs(0, 2, 150, 2, 32, 16)
  check_forward("xla", x, 1e-5)
  check_grads("xla", x)


def test_signature_defaults():
  x = make_inputs(1, 1, 65, 2, 16, 16, resets=False, init=False)
  o, s = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="xla")
  assert s is None and o.shape == (1, 65, 2, 16)
  o_ref, _ = naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
  assert rel(o, o_ref) <= 1e-5
  o2, s2 = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True)
  assert rel(o2, o_ref) <= 1e-6 and s2.shape == (1, 2, 16, 16)


def test_reset_equals_separate_sequences():
  """A reset makes the second document independent of the first (and of the initial state)."""
  x = make_inputs(2, 1, 100, 1, 16, 16, resets=False)
  seg = jnp.where(jnp.arange(100) < 37, 3, 7)[None]  # ids need not be consecutive
  o, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                                segment_ids=seg, backend="xla")
  o2, _ = chunk_gated_delta_rule(*(x[n][:, 37:] for n in ("q", "k", "v", "g", "beta")), backend="xla")
  assert rel(o[:, 37:], o2) <= 1e-5
