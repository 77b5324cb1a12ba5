"""Can one Mosaic GPU kernel doing the MLP's gate_up product and SiLU x up beat XLA's product plus its elementwise
kernel in a batch-1 decode step? The kernel takes the decode rows x [R <= 8, D] and the fused weight [D, 2I] (gate
columns, then up columns) and returns h^T [I, 8] = (silu(x W_gate) * x W_up)^T, columns past R zero:
  - one memory warpgroup streams [block_k, 64] tiles of the gate and up columns by TMA into a ring of ``stages``
    shared-memory slots; one compute warpgroup runs wgmma with the weight tile as the (transposed) 64-row operand
    and x^T as the 8-column one, asynchronously, releasing each slot once the next step's products are issued;
  - x arrives once per CTA by TMA as 8 rows: rows past R lie outside the array and arrive as zeros;
  - work is split stream-K: the 64-column units' k-blocks, in order, are cut into ``ctas`` equal ranges. A unit cut
    between two CTAs is finished by the earlier one, which adds the later one's partial products, handed over
    through global memory and a semaphore. A CTA waits only on the next one, which must therefore be resident:
    ``ctas`` at most the number of SMs (1 CTA per SM at these sizes), or a divisor of I / 64, where no unit is cut.
Timings interleave XLA and four settings over 5 rounds in one process, each a jitted program over 8 distinct
layers: gate_up + SiLU alone, and the MLP chain (the down product and residual add included; the kernel's h^T is
contracted on its first axis); and two settings with the products left out (``stream_only``), where the 86-CTA one
reads in aligned order and the 132-CTA one in stream-K's. Writes $OUT/gate_up_silu.json.

    PYTHONPATH=. python3 benchmarks/gate_up_silu_probe.py           # an sm90 GPU
    PYTHONPATH=. python3 benchmarks/gate_up_silu_probe.py --lower   # CPU: lower the kernel for CUDA only
"""
import functools, json, os, sys
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from pallas_kernels.sliding_window_attention.flash_mosaic import _stream

sys.path.insert(0, os.path.dirname(__file__))
from timing import pipelined_seconds  # noqa: E402  (benchmarks/timing.py)
from decode_mlp_common import interleaved_rounds, mlp_chain, paired_products, probe_inputs, rel_err  # noqa: E402


def gate_up_silu(x, w, *, block_k=128, stages=4, ctas=132, stream_only=False):
  """``stream_only``: the compute warpgroup releases each slot without products (a timing probe of the streaming
  and its order alone; the output is then meaningless)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  R, D = x.shape
  n = 64
  I = w.shape[1] // 2
  U, KB = I // n, D // block_k
  S = U * KB
  if R > 8 or I % n or D % block_k or S // ctas < KB:
    raise ValueError(f"gate_up_silu: needs R <= 8, I % 64 == 0, D % block_k == 0 and at least D / block_k "
                     f"k-blocks per CTA (ctas <= about I / 64); got R={R}, I={I}, D={D}, block_k={block_k}, "
                     f"ctas={ctas}")
  WG = plgpu.Layout.WGMMA

  def body(x_ref, w_ref, o_ref, ws_ref, x_smem, g_smem, u_smem, h_smem, p_smem,
           x_ready, g_ready, u_ready, free, p_ready):
    wg = lax.axis_index("wg")
    c = lax.axis_index("cta")
    start = c * S // ctas
    end = (c + 1) * S // ctas
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR((U,)))

    @pl.when(wg == 0)
    def _compute():
      plgpu.barrier_wait(x_ready)

      def finish(u, g, up):
        h = g * jax.nn.sigmoid(g) * up
        plgpu.wait_smem_to_gmem(0)
        h_smem[...] = h.astype(h_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_smem, o_ref.at[pl.ds(u * n, n)])

      def unit(u, _):
        kk0 = jnp.maximum(start - u * KB, 0)
        kk1 = jnp.minimum(end - u * KB, KB)

        def issue(refs, kk, slot):
          if not stream_only:
            xs = plgpu.transpose_ref(x_smem.at[:, pl.ds(kk * block_k, block_k)], (1, 0))
            plgpu.wgmma(refs[0], plgpu.transpose_ref(g_smem.at[slot], (1, 0)), xs)
            plgpu.wgmma(refs[1], plgpu.transpose_ref(u_smem.at[slot], (1, 0)), xs)
          return not stream_only
        zeros = plgpu.layout_cast(jnp.zeros((n, 8), jnp.float32), WG)
        g, up = paired_products(kk0, kk1, lambda kk: u * KB + kk - start, (g_ready, u_ready), free, stages, issue,
                                zeros)

        @pl.when(kk0 > 0)  # the unit's last k-blocks, at this CTA's start: hand them to the CTA before
        def _tail():
          p_smem.at[0][...] = g
          p_smem.at[1][...] = up
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(p_smem, ws_ref.at[u])
          plgpu.wait_smem_to_gmem(0)
          plgpu.semaphore_signal(sem.at[u], 1, memory_scope="gpu")

        @pl.when((kk0 == 0) & (kk1 == KB))
        def _whole():
          finish(u, g, up)

        @pl.when((kk0 == 0) & (kk1 < KB))  # the unit's first k-blocks, at this CTA's end: add the next CTA's
        def _head():
          plgpu.semaphore_wait(sem.at[u], 1, memory_scope="gpu")
          plgpu.copy_gmem_to_smem(ws_ref.at[u], p_smem, p_ready)
          plgpu.barrier_wait(p_ready)
          finish(u, g + plgpu.load(p_smem.at[0], (), layout=WG), up + plgpu.load(p_smem.at[1], (), layout=WG))
        return _

      lax.fori_loop(start // KB, (end - 1) // KB + 1, unit, None)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
      plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 8)], x_smem, x_ready)

      def fetch(i, slot):
        s = start + i
        u, kk = s // KB, lax.rem(s, KB)
        rows = pl.ds(kk * block_k, block_k)
        plgpu.copy_gmem_to_smem(w_ref.at[rows, pl.ds(u * n, n)], g_smem.at[slot], g_ready.at[slot])
        plgpu.copy_gmem_to_smem(w_ref.at[rows, pl.ds(I + u * n, n)], u_smem.at[slot], u_ready.at[slot])
      _stream(fetch, end - start, stages, (free,))

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  h_t, _ = plgpu.kernel(
      body, out_type=(jax.ShapeDtypeStruct((I, 8), x.dtype), jax.ShapeDtypeStruct((U, 2, n, 8), jnp.float32)),
      scratch_types=[plgpu.SMEM((8, D), x.dtype, **tiled),
                     plgpu.SMEM((stages, block_k, n), w.dtype, **tiled),
                     plgpu.SMEM((stages, block_k, n), w.dtype, **tiled),
                     plgpu.SMEM((n, 8), x.dtype),
                     plgpu.SMEM((2, n, 8), jnp.float32),
                     plgpu.Barrier(), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                     plgpu.Barrier(num_arrivals=1, num_barriers=stages), plgpu.Barrier()],
      grid=(ctas,), grid_names=("cta",), num_threads=2, thread_name="wg")(x, w)
  return h_t


def reference(x, w):
  I = w.shape[1] // 2
  y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  return jax.nn.silu(y[:, :I]) * y[:, I:]


def xla_gu(x, ws):
  I = ws[0].shape[1] // 2
  return [jax.nn.silu(y[:, :I]) * y[:, I:] for y in (x @ w for w in ws)]


def mosaic_layer(x, w_gu, w_down, cfg):
  """The MLP with this kernel's h^T, contracted on its first axis by XLA's down product."""
  return lax.dot_general(gate_up_silu(x, w_gu, **cfg), w_down, (((0,), (0,)), ((), ())))[: x.shape[0]]


def gate_up_over_layers(cfg):
  return jax.jit(lambda x, ws: [gate_up_silu(x, w, **cfg) for w in ws])


CONFIGS = [dict(block_k=64, stages=8, ctas=86), dict(block_k=64, stages=4, ctas=172),
           dict(block_k=128, stages=4, ctas=86), dict(block_k=128, stages=4, ctas=132)]
PROBES = [dict(block_k=128, stages=4, ctas=86, stream_only=True),
          dict(block_k=128, stages=4, ctas=132, stream_only=True)]

if __name__ == "__main__":
  D, I, L = 2048, 11008, 8
  if "--lower" in sys.argv:
    from pallas_kernels import _compat
    for cfg in CONFIGS + PROBES:
      with _compat.compiled():
        jax.jit(functools.partial(gate_up_silu, **cfg)).trace(
            jax.ShapeDtypeStruct((1, D), jnp.bfloat16), jax.ShapeDtypeStruct((D, 2 * I), jnp.bfloat16)
        ).lower(lowering_platforms=("cuda",))
      print("lowered", cfg)
    sys.exit()
  res, wgu, wd, x, x2 = probe_inputs(L, D, I)
  res["errors"] = {}
  for cfg in CONFIGS:  # correctness first: against the float32 product, R = 1 and 2, and one MLP layer against XLA's
    f = jax.jit(functools.partial(gate_up_silu, **cfg))
    key = "{block_k}/{stages}/{ctas}".format(**cfg)
    h1, h2 = f(x, wgu[0]).astype(jnp.float32), f(x2, wgu[1]).astype(jnp.float32)
    one = jax.jit(functools.partial(mlp_chain, layer=functools.partial(mosaic_layer, cfg=cfg)))(x, wgu[:1], wd[:1])
    res["errors"][key] = {"R1": rel_err(h1[:, 0], reference(x, wgu[0])[0]),
                          "R2": rel_err(h2[:, :2].T, reference(x2, wgu[1])),
                          "pad_max": float(jnp.abs(h1[:, 1:]).max()),
                          "mlp_layer": rel_err(one, jax.jit(mlp_chain)(x, wgu[:1], wd[:1]))}
    print(key, res["errors"][key], flush=True)
  fx_gu, fx_mlp = jax.jit(xla_gu), jax.jit(mlp_chain)
  timers = {"xla gu": lambda: pipelined_seconds(fx_gu, x, wgu) / L,
            "xla mlp": lambda: pipelined_seconds(fx_mlp, x, wgu, wd) / L}
  for cfg in CONFIGS:
    key = "{block_k}/{stages}/{ctas}".format(**cfg)
    a = gate_up_over_layers(cfg)
    b = jax.jit(functools.partial(mlp_chain, layer=functools.partial(mosaic_layer, cfg=cfg)))
    timers["gu " + key] = lambda a=a: pipelined_seconds(a, x, wgu) / L
    timers["mlp " + key] = lambda b=b: pipelined_seconds(b, x, wgu, wd) / L
  for cfg in PROBES:
    f = gate_up_over_layers(cfg)
    timers["gu stream only {block_k}/{stages}/{ctas}".format(**cfg)] = lambda f=f: pipelined_seconds(f, x, wgu) / L
  res["rounds_us"], res["median_us"] = interleaved_rounds(timers)
  json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gate_up_silu.json"), "w"), indent=1)
