"""A decode step's whole MLP in one Mosaic GPU kernel, with no grid-wide synchronisation: each CTA computes
h = silu(x W_gate) * (x W_up) for its own ``64 * upc`` intermediate columns (phase 1), keeps h in shared memory, then
multiplies it by the same rows of W_down (phase 2) and writes its partial output P[c] ([R, D] float32); XLA sums
the partials (one reduction fused with the residual add). One memory warpgroup streams every tile of both phases
through one ring of ``stages`` slots, so phase 2's weights arrive while phase 1 drains; one compute warpgroup runs
wgmma with the decode rows as the 64-row operand (x arrives by TMA as 64 rows of a [R, D] array: rows past R are
zeros) and the weight tile as the other. I / 64 = 172 units must divide evenly, so ``ctas`` = 172 / ``upc`` (86 for
upc = 2). Interleaved against XLA's MLP over 5 rounds, each a jitted chain of 8 layers with distinct weights
(x = x + MLP(x)), with two more settings whose compute warpgroup skips the products (``stream_only``: the
kernel's streaming alone). Writes $OUT/fused_mlp.json.

    PYTHONPATH=. python3 benchmarks/fused_mlp_probe.py           # an sm90 GPU
    PYTHONPATH=. python3 benchmarks/fused_mlp_probe.py --lower   # CPU: lower the kernel for CUDA only
"""
import functools, json, os, sys
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from pallas_kernels.sliding_window_attention.flash_mosaic import _stream

sys.path.insert(0, os.path.dirname(__file__))
from timing import pipelined_seconds  # noqa: E402  (benchmarks/timing.py)
from decode_mlp_common import (interleaved_rounds, mlp_chain, paired_products, probe_inputs,  # noqa: E402
                               rel_err, xla_mlp_layer)


def mlp_partials(x, w_gu, w_down, *, upc=2, block_k=64, stages=6, stream_only=False):
  """``stream_only``: the compute warpgroup releases each slot without products (a timing probe of the
  kernel's streaming alone; its output is then meaningless)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  R, D = x.shape
  I = w_down.shape[0]
  n = 64
  U = I // n
  G = U // upc
  KB = D // block_k            # phase-1 steps per unit
  cols = 2 * n                 # phase-2 output columns per step (two 64-column halves)
  rows2 = upc * n              # this CTA's rows of W_down
  KH = rows2 // block_k        # phase-2 steps per column block
  NB = D // cols               # phase-2 column blocks
  steps1, steps2 = upc * KB, NB * KH
  if R > 8 or I % n or U % upc or D % block_k or D % cols or rows2 % block_k:
    raise ValueError(f"mlp_partials: needs R <= 8, I % 64 == 0, (I / 64) % upc == 0, D % 128 == 0 and block_k "
                     f"dividing both D and 64 * upc; got R={R}, I={I}, D={D}, upc={upc}, block_k={block_k}")
  WG = plgpu.Layout.WGMMA

  def body(x_ref, wgu_ref, wd_ref, p_ref, x_s, g_s, u_s, h_s, st_s, x_ready, g_ready, u_ready, free):
    wg = lax.axis_index("wg")
    c = lax.axis_index("cta")

    @pl.when(wg == 0)
    def _compute():
      zeros = plgpu.layout_cast(jnp.zeros((64, n), jnp.float32), WG)

      def unit(j, _):
        def issue(refs, k, slot):
          if not stream_only:
            plgpu.wgmma(refs[0], x_s.at[slot], g_s.at[slot])
            plgpu.wgmma(refs[1], x_s.at[slot], u_s.at[slot])
          return not stream_only
        g, up = paired_products(0, KB, lambda k: j * KB + k, (x_ready, g_ready, u_ready), free, stages, issue, zeros)
        h_s.at[:, pl.ds(j * n, n)][...] = (g * jax.nn.sigmoid(g) * up).astype(h_s.dtype)
        return _
      lax.fori_loop(0, upc, unit, None)
      plgpu.commit_smem()  # h is read by the products below

      def block(b, _):
        def issue(refs, k, slot):
          if not stream_only:
            hk = h_s.at[:, pl.ds(k * block_k, block_k)]
            plgpu.wgmma(refs[0], hk, g_s.at[slot])
            plgpu.wgmma(refs[1], hk, u_s.at[slot])
          return not stream_only
        lo, hi = paired_products(0, KH, lambda k: steps1 + b * KH + k, (g_ready, u_ready), free, stages, issue, zeros)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        st_s.at[0][...] = lo
        st_s.at[1][...] = hi
        plgpu.commit_smem()
        for half in range(2):
          plgpu.copy_smem_to_gmem(st_s.at[half, pl.ds(0, 8)],
                                  p_ref.at[c, pl.ds(0, 8), pl.ds(b * cols + half * n, n)])
        return _
      lax.fori_loop(0, NB, block, None)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
      def fetch(i, slot):
        @pl.when(i < steps1)
        def _phase1():
          u = c * upc + i // KB
          k = lax.rem(i, KB)
          krows = pl.ds(k * block_k, block_k)
          plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, 64), krows], x_s.at[slot], x_ready.at[slot])  # rows >= R: zeros
          plgpu.copy_gmem_to_smem(wgu_ref.at[krows, pl.ds(u * n, n)], g_s.at[slot], g_ready.at[slot])
          plgpu.copy_gmem_to_smem(wgu_ref.at[krows, pl.ds(I + u * n, n)], u_s.at[slot], u_ready.at[slot])

        @pl.when(i >= steps1)
        def _phase2():
          b = (i - steps1) // KH
          k = lax.rem(i - steps1, KH)
          drows = pl.ds(c * rows2 + k * block_k, block_k)
          plgpu.copy_gmem_to_smem(wd_ref.at[drows, pl.ds(b * cols, n)], g_s.at[slot], g_ready.at[slot])
          plgpu.copy_gmem_to_smem(wd_ref.at[drows, pl.ds(b * cols + n, n)], u_s.at[slot], u_ready.at[slot])
      _stream(fetch, steps1 + steps2, stages, (free,))

  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  tiled32 = dict(transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((G, R, D), jnp.float32),
      scratch_types=[plgpu.SMEM((stages, 64, block_k), x.dtype, **tiled),
                     plgpu.SMEM((stages, block_k, n), x.dtype, **tiled),
                     plgpu.SMEM((stages, block_k, n), x.dtype, **tiled),
                     plgpu.SMEM((64, rows2), x.dtype, **tiled),
                     plgpu.SMEM((2, 64, n), jnp.float32, **tiled32),
                     plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                     plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages)],
      grid=(G,), grid_names=("cta",), num_threads=2, thread_name="wg")(x, w_gu, w_down)


def mlp(x, w_gu, w_down, **cfg):
  return mlp_partials(x, w_gu, w_down, **cfg).sum(0).astype(x.dtype)


if __name__ == "__main__":
  D, I, L = 2048, 11008, 8
  CONFIGS = [dict(upc=2, block_k=64, stages=6), dict(upc=2, block_k=64, stages=4), dict(upc=2, block_k=128, stages=3),
             dict(upc=1, block_k=64, stages=3)]
  PROBES = [dict(upc=2, block_k=128, stages=3, stream_only=True), dict(upc=2, block_k=64, stages=6, stream_only=True)]
  if "--lower" in sys.argv:
    from pallas_kernels import _compat
    for cfg in CONFIGS:
      with _compat.compiled():
        jax.jit(functools.partial(mlp, **cfg)).trace(
            jax.ShapeDtypeStruct((1, D), jnp.bfloat16), jax.ShapeDtypeStruct((D, 2 * I), jnp.bfloat16),
            jax.ShapeDtypeStruct((I, D), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
      print("lowered", cfg)
    sys.exit()
  res, wgu, wd, x, x2 = probe_inputs(L, D, I)

  def f32_layer(x, a, b):
    return xla_mlp_layer(*(t.astype(jnp.float32) for t in (x, a, b)))

  res["errors"] = {"xla": rel_err(jax.jit(xla_mlp_layer)(x, wgu[0], wd[0]), f32_layer(x, wgu[0], wd[0]))}
  ok = []
  for cfg in CONFIGS:
    key = "{upc}/{block_k}/{stages}".format(**cfg)
    try:
      f = jax.jit(functools.partial(mlp, **cfg))
      res["errors"][key] = {"R1": rel_err(f(x, wgu[0], wd[0]), f32_layer(x, wgu[0], wd[0])),
                            "R2": rel_err(f(x2, wgu[1], wd[1]), f32_layer(x2, wgu[1], wd[1]))}
      ok.append(cfg)
    except Exception as e:
      res["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
    print(key, res["errors"][key], flush=True)
  fx = jax.jit(mlp_chain)
  ok = ok + PROBES
  fm = [jax.jit(functools.partial(mlp_chain, layer=functools.partial(mlp, **cfg))) for cfg in ok]
  timers = {"xla": lambda: pipelined_seconds(fx, x, wgu, wd) / L}
  for cfg, g in zip(ok, fm):
    key = "{upc}/{block_k}/{stages}".format(**cfg) + (" stream only" if cfg.get("stream_only") else "")
    timers[key] = lambda g=g: pipelined_seconds(g, x, wgu, wd) / L
  res["rounds_us"], res["median_us"] = interleaved_rounds(timers)
  json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "fused_mlp.json"), "w"), indent=1)
