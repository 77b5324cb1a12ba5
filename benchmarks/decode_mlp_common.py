"""Pieces shared by the decode MLP kernel probes (`gate_up_silu_probe.py`, `fused_mlp_probe.py`): the compute
warpgroup's loop of paired asynchronous products over ring slots, the probes' inputs, XLA's MLP layer and the chain
of layers they are timed in, and the relative error."""
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from timing import read_probe_tbps


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
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "probe_TBps": read_probe_tbps()}
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


def xla_mlp_layer(x, w_gu, w_down):
  """XLA's SwiGLU MLP for decode rows x [R, D] with the fused gate_up weight [D, 2I] and down [I, D]."""
  I = w_down.shape[0]
  y = x @ w_gu
  return (jax.nn.silu(y[:, :I]) * y[:, I:]) @ w_down


def mlp_chain(x, wgu, wd, layer=xla_mlp_layer):
  """``x = x + layer(x, w_gu, w_down)`` over the layers' weights: each layer's output feeds the next, as in a decode
  step."""
  for a, b in zip(wgu, wd):
    x = x + layer(x, a, b)
  return x


def rel_err(a, b):
  """||a - b|| / ||b||, in float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
