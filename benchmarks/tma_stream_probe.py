"""How fast can one kernel stream a decode weight at all? A Mosaic GPU kernel that only streams the weight by TMA into
a shared-memory ring (no products; ``ctas`` programs taking its [tile_k, tile_n] tiles in turn, one memory and one
consuming warpgroup each) against XLA's two-row product over the same weights and the read-rate probe (a float32
sum over 4 GiB). Each timing runs 2-8 distinct weights (134 MB or more, above L2) in one jitted program, dispatched
from the host in a loop. The 16.8 MB rows are probably bounded by that dispatch (XLA's product measures 13.6 us
there, against 6.7 us in the decode step's device profile), so only the two larger shapes are read as device times.
Writes $OUT/tma_stream.json.

    PYTHONPATH=. python3 benchmarks/tma_stream_probe.py
    PYTHONPATH=. python3 benchmarks/tma_stream_probe.py --sizes   # [2048, N] weights of 45-721 MB, and a line fit
"""
import functools, json, os, sys
import numpy as np, jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from pallas_kernels.sliding_window_attention.flash_mosaic import _stream

sys.path.insert(0, os.path.dirname(__file__))
from timing import pipelined_seconds, read_probe_tbps  # noqa: E402  (benchmarks/timing.py)


def drain(n, stages, ready, free):
  """The consuming warpgroup of a stream-only kernel: wait for each of ``n`` ring steps and release its slot."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  @pl.loop(0, n)
  def _(s):
    slot = lax.rem(s, stages)
    plgpu.barrier_wait(ready.at[slot])
    plgpu.barrier_arrive(free.at[slot])


def stream_probe(w, *, tile_k, tile_n, stages, ctas):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    K, N = w.shape
    nb, kb = N // tile_n, K // tile_k
    T = nb * kb

    def body(w_ref, o_ref, w_smem, ready, free):
        wg = lax.axis_index("wg")
        c = lax.axis_index("cta")
        mine = (T - c + ctas - 1) // ctas

        @pl.when(wg == 0)
        def _consume():
            drain(mine, stages, ready, free)

        @pl.when(wg == 1)
        def _memory():
            def fetch(s, slot):
                t = c + s * ctas
                kt, nt = t // nb, lax.rem(t, nb)
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(kt * tile_k, tile_k), pl.ds(nt * tile_n, tile_n)],
                                        w_smem.at[slot], ready.at[slot])
            _stream(fetch, mine, stages, (free,))

    tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((ctas, 128), jnp.float32),
        scratch_types=[plgpu.SMEM((stages, tile_k, tile_n), w.dtype, **tiled),
                       plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages)],
        grid=(ctas,), grid_names=("cta",), num_threads=2, thread_name="wg")(w)


if __name__ == "__main__":
    lower_only = "--lower" in sys.argv
    res = {"rows": []}
    shapes = [(2048, 22016), (11008, 2048), (4096, 2048)]
    configs = [dict(tile_k=tk, tile_n=tn, stages=st, ctas=ct) for tk, tn in ((64, 128), (128, 128), (256, 64))
               for st in (4, 6) for ct in (132, 264)]
    if lower_only:
        from pallas_kernels import _compat
        for K, N in shapes[:1]:
            w = jax.ShapeDtypeStruct((K, N), jnp.bfloat16)
            for cfg in configs[:3]:
                with _compat.compiled():
                    jax.jit(functools.partial(stream_probe, **cfg)).trace(w).lower(lowering_platforms=("cuda",))
                print("lowered", cfg)
        sys.exit()
    sizes = "--sizes" in sys.argv  # one weight shape [2048, N] at growing N: time = fixed cost + bytes / rate
    if sizes:
        shapes = [(2048, n) for n in (11008, 22016, 44032, 88064, 176128)]
        configs = [dict(tile_k=256, tile_n=64, stages=6, ctas=132), dict(tile_k=64, tile_n=128, stages=4, ctas=264)]
    res["device"] = jax.devices()[0].device_kind
    res["probe_TBps"] = read_probe_tbps()
    print(f"read probe {res['probe_TBps']:.2f} TB/s", flush=True)
    for K, N in shapes:
        L = max(2, min(8, (720 << 20) // (K * N * 2)))  # distinct weights per program: more than L2 in all
        ws = [jax.random.normal(jax.random.key(i), (K, N), jnp.float32).astype(jnp.bfloat16) for i in range(L)]
        x = jnp.ones((2, K), jnp.bfloat16)
        nbytes = K * N * 2
        t = pipelined_seconds(jax.jit(lambda x, ws: [x @ w for w in ws]), x, ws) / L
        row = {"K": K, "N": N, "MB": nbytes / 1e6, "xla_us": t * 1e6, "xla_TBps": nbytes / t / 1e12}
        print(f"[{K}, {N}] {nbytes/1e6:.1f} MB: XLA two-row product {t*1e6:.2f} us ({nbytes/t/1e12:.2f} TB/s), "
              f"floor at the probe {nbytes/res['probe_TBps']/1e6:.2f} us", flush=True)
        for cfg in configs:
            if N % cfg["tile_n"] or K % cfg["tile_k"]:
                continue
            try:
                f = jax.jit(lambda ws, cfg=cfg: [stream_probe(w, **cfg) for w in ws])
                t = pipelined_seconds(f, ws) / L
                row[str(cfg)] = t * 1e6
                print(f"   TMA stream {cfg}: {t*1e6:.2f} us ({nbytes/t/1e12:.2f} TB/s)", flush=True)
            except Exception as e:
                print(f"   TMA stream {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        res["rows"].append(row)
        del ws
    if sizes:  # least-squares line through (bytes, time) per method
        for key in ["xla_us"] + [str(c) for c in configs]:
            pts = [(r["MB"], r[key]) for r in res["rows"] if key in r]
            slope, icpt = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            res.setdefault("fit", {})[key] = {"fixed_us": float(icpt), "TBps": float(1 / slope)}  # MB/us = TB/s
            print(f"fit {key}: fixed {icpt:.2f} us + bytes at {1 / slope:.2f} TB/s", flush=True)
    name = "tma_stream_sizes.json" if sizes else "tma_stream.json"
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), name), "w"), indent=1)
