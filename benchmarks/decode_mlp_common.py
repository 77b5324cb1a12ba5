"""Pieces shared by the decode MLP kernel probes (`gate_up_silu_probe.py`, `fused_mlp_probe.py`): the compute
warpgroup's loop of paired asynchronous products over ring slots, and the probes' inputs."""
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from timing import pipelined_seconds


def paired_products(first, last, slot_of, waits, free, stages, issue, zeros):
  """Steps ``first .. last - 1``: wait on the step's slot (each barrier array in ``waits``), ``issue(refs, k, slot)``
  two wgmma products into the accumulators, and release the previous step's slot once the products before this
  step's are done (wgmma_wait(2)), the last slot after all. Returns the two accumulators' values."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(refs):
    def step(k, _):
      i = slot_of(k)
      slot = lax.rem(i, stages)
      for barrier in waits:
        plgpu.barrier_wait(barrier.at[slot])
      if issue(refs, k, slot):
        plgpu.wgmma_wait(2)

      @pl.when(k > first)
      def _():
        plgpu.barrier_arrive(free.at[lax.rem(i + stages - 1, stages)])
      return _
    lax.fori_loop(first, last, step, None)
    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(free.at[lax.rem(slot_of(last - 1), stages)])
  return pl.run_state(body)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))


def probe_inputs(L, D, I):
  """The read-rate probe (TB/s, a float32 sum over 4 GiB) and L distinct MLP layers' bf16 weights (gate_up [D, 2I],
  down [I, D]) with decode rows x [1, D] and x2 [2, D]."""
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  big = jnp.ones((1 << 31,), jnp.bfloat16)
  res["probe_TBps"] = big.nbytes / pipelined_seconds(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), big) / 1e12
  del big
  print(res, flush=True)
  keys = jax.random.split(jax.random.key(0), 2 * L + 2)
  wgu = [(jax.random.normal(keys[i], (D, 2 * I), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  wd = [(jax.random.normal(keys[L + i], (I, D), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  x = jax.random.normal(keys[-2], (1, D), jnp.float32).astype(jnp.bfloat16)
  x2 = jax.random.normal(keys[-1], (2, D), jnp.float32).astype(jnp.bfloat16)
  return res, wgu, wd, x, x2


def interleaved_rounds(timers, rounds=5):
  """Each round times every ``name: thunk`` in turn (us per call of the thunk, which returns seconds); returns the
  rounds and the per-name medians."""
  import numpy as np
  out = []
  for _ in range(rounds):
    row = {name: t() * 1e6 for name, t in timers.items()}
    print({k: round(v, 2) for k, v in row.items()}, flush=True)
    out.append(row)
  med = {k: float(np.median([r[k] for r in out])) for k in out[0]}
  print("median us", {k: round(v, 2) for k, v in med.items()}, flush=True)
  return out, med
