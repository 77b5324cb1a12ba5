"""What does a grid-wide barrier cost inside one Mosaic GPU kernel? A persistent kernel that fuses a decode step's
products (see `fused_mlp_probe.py`) needs one between phases. ``ctas`` CTAs (one warpgroup each, all resident) run
``n`` barriers in a loop: each CTA adds 1 to a global counter (``semaphore_signal``, a release reduction) and spins
until it reaches ``ctas * k`` at barrier k (relaxed loads, then an acquire fence); at exit CTA 0 waits for every CTA
to leave and resets the counter, so each launch starts from zero. The slope of time against ``n`` is the cost of one
barrier, to compare with a kernel boundary (`kernel_chain.py`: 0.80-0.96 us on an H200). Writes
$OUT/grid_barrier.json.

    PYTHONPATH=. python3 benchmarks/grid_barrier_probe.py           # an sm90 GPU
    PYTHONPATH=. python3 benchmarks/grid_barrier_probe.py --lower   # CPU: lower the kernel for CUDA only
"""
import functools, json, os, sys
import numpy as np, jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(__file__))
from timing import pipelined_seconds  # noqa: E402  (benchmarks/timing.py)


def grid_barrier(arrive, ctas, k):
  """The k-th (from 1) grid-wide barrier of a launch over the global counter ``arrive``."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")
  plgpu.semaphore_wait(arrive, ctas * k, decrement=False, memory_scope="gpu")


def reset_barriers(arrive, done, ctas, n):
  """At a launch's end, after its ``n`` grid barriers: CTA 0 waits until every CTA has passed the last one (counted
  on ``done``, which the wait brings back to zero) and sets ``arrive`` back to zero for the next launch."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  plgpu.semaphore_signal(done, 1, memory_scope="gpu")

  @pl.when(lax.axis_index("cta") == 0)
  def _():
    plgpu.semaphore_wait(done, ctas, memory_scope="gpu")
    plgpu.semaphore_signal(arrive, -ctas * n, memory_scope="gpu")


def barriers(n, *, ctas):
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(o_ref):
    arrive = pl.get_global(plgpu.SemaphoreType.REGULAR)
    done = pl.get_global(plgpu.SemaphoreType.REGULAR)
    pl.loop(1, n + 1)(lambda k: grid_barrier(arrive, ctas, k))
    reset_barriers(arrive, done, ctas, n)

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ctas, 128), jnp.float32), grid=(ctas,),
                      grid_names=("cta",))()


if __name__ == "__main__":
  counts, grids = (1, 21, 101, 401), (132, 66)
  if "--lower" in sys.argv:
    from pallas_kernels import _compat
    for ctas in grids:
      with _compat.compiled():
        jax.jit(functools.partial(barriers, 5, ctas=ctas)).trace().lower(lowering_platforms=("cuda",))
      print("lowered", ctas)
    sys.exit()
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
  for ctas in grids:
    ts = []
    for n in counts:
      f = jax.jit(lambda n=n: [barriers(n, ctas=ctas) for _ in range(8)])
      t = pipelined_seconds(f) / 8
      ts.append(t * 1e6)
      res["rows"].append({"ctas": ctas, "barriers": n, "us_per_launch": t * 1e6})
      print(f"{ctas} CTAs, {n} barriers: {t * 1e6:.2f} us per launch", flush=True)
    slope, icpt = np.polyfit(counts, ts, 1)
    res[f"fit_{ctas}"] = {"us_per_barrier": float(slope), "us_per_launch_without": float(icpt)}
    print(f"{ctas} CTAs: {slope:.3f} us per barrier, {icpt:.2f} us per launch besides", flush=True)
  json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "grid_barrier.json"), "w"), indent=1)
