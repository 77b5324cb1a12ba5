"""Timing of a jitted call the way a decode loop runs it: calls dispatched back to back, synchronised once per group."""

from __future__ import annotations

import time

import jax
import numpy as np


def pipelined_seconds(f, *args, calls: int = 20, groups: int = 5, warmup: int = 2) -> float:
  """Median over ``groups`` of the seconds per call of ``calls`` back-to-back calls of ``f(*args)``."""
  for _ in range(warmup):
    out = f(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(groups):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / calls)
  return float(np.median(ts))


def read_probe_tbps(nbytes: int = 1 << 32) -> float:
  """TB/s of a streaming read: a float32 sum over ``nbytes`` of bf16, timed by ``pipelined_seconds``."""
  import jax.numpy as jnp
  big = jnp.ones((nbytes // 2,), jnp.bfloat16)
  return big.nbytes / pipelined_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), big) / 1e12
