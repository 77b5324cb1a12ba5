"""Could one persistent kernel per GDN decode layer beat today's kernels? Its memory schedule alone, measured first.

Today a GDN layer's decode (without its MLP) is in_proj, the two mixer kernels, the output norm, o_proj and its
split-K reduction: 30.8 us per layer in the H200 step profile. A persistent kernel would run in_proj on all SMs, a
grid barrier, the mixer, a barrier, then o_proj, with o_proj's weight requested before the barriers so that its
bytes stream while the CTAs wait. This probe builds that kernel without any arithmetic: ``ctas`` CTAs (one compute
and one memory warpgroup each) stream
  * in_proj [2048, 12320] in 385 units of 32 columns (2 or 3 per CTA), [tile_k, 32] tiles through a shared-memory
    ring;
  * the recurrent state (float32 [16, 128, 256]) in 128 blocks of [128, 32]: loaded before the first barrier, stored
    after it (to a new array, same bytes), the store waited for before the second barrier or at the end;
  * o_proj [4096, 2048] in 128 units of 16 columns (one per CTA, 128 KB in shared memory), requested right after
    in_proj's last tile when ``early`` (else after the second barrier).
The compute warpgroup waits for every tile and passes the two grid barriers (a global counter, as in
`grid_barrier_probe.py`). Timed in a chain of L layers with distinct weights and states against the same chain of
XLA's products (x @ in_proj, its v columns @ o_proj, the residual add): what the persistent kernel's arithmetic,
the mixer and the norm would have to fit into. Writes $OUT/gdn_layer_stream.json.

    PYTHONPATH=. python3 benchmarks/gdn_layer_stream_probe.py           # an sm90 GPU
    PYTHONPATH=. python3 benchmarks/gdn_layer_stream_probe.py --lower   # CPU: lower every setting for CUDA
"""
import functools, json, os, sys

import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(__file__))
from decode_mlp_common import interleaved_rounds  # noqa: E402
from grid_barrier_probe import grid_barrier, reset_barriers  # noqa: E402
from tma_stream_probe import drain  # noqa: E402
from timing import pipelined_seconds, read_probe_tbps  # noqa: E402

from pallas_kernels.sliding_window_attention.flash_mosaic import _stream  # noqa: E402

D, N_IN = 2048, 12320  # model width, in_proj columns (q, k, v, gate, a, b)
H, DK, DV = 16, 128, 256  # GDN heads, key and value head sizes (the state is [H, DK, DV] float32)
HV = H * DV  # v columns of in_proj, rows of o_proj
UNIT_IN, UNIT_O, TILE_O, SV = 32, 16, 256, 32  # columns per in_proj / o_proj unit, o_proj tile rows, state block cols
L = 27


def layer_stream(x, w_in, w_o, state, *, tile_k, stages, ctas, early=True, barriers=True, store_wait="end",
                 slabs=False):
  """Stream one layer's bytes as described above; returns a dummy [ctas, 128] and the state's copy. The state's store
  is waited for before the second barrier (``store_wait="before"``) or at the end. With ``slabs`` the weights come
  unit-major (`to_slabs`), so that each unit is one contiguous block."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  n_units = N_IN // UNIT_IN
  kb = D // tile_k
  o_tiles = HV // TILE_O
  s_blocks = H * (DV // SV)
  assert ctas >= max(s_blocks, D // UNIT_O) and N_IN % UNIT_IN == 0 and D % tile_k == 0

  def body(x_ref, win_ref, wo_ref, st_ref, o_ref, st_out, ring, wo_smem, st_smem, ready, free, o_ready, st_ready):
    wg = lax.axis_index("wg")
    c = lax.axis_index("cta")
    mine = (n_units - c + ctas - 1) // ctas * kb  # in_proj tiles of this CTA: units c, c + ctas, ...
    has_o = c < D // UNIT_O
    has_st = c < s_blocks
    head, vblk = c // (DV // SV), lax.rem(c, DV // SV)
    if barriers:
      arrive = pl.get_global(plgpu.SemaphoreType.REGULAR)
      done = pl.get_global(plgpu.SemaphoreType.REGULAR)

    def sync(k):
      if barriers:
        grid_barrier(arrive, ctas, k)

    def fetch_o():
      @pl.when(has_o)
      def _():
        for t in range(o_tiles):
          src = (wo_ref.at[c, pl.ds(t * TILE_O, TILE_O)] if slabs
                 else wo_ref.at[pl.ds(t * TILE_O, TILE_O), pl.ds(c * UNIT_O, UNIT_O)])
          plgpu.copy_gmem_to_smem(src, wo_smem.at[t], o_ready.at[t])

    @pl.when(wg == 0)
    def _compute():
      drain(mine, stages, ready, free)
      sync(1)

      @pl.when(has_st)
      def _():
        plgpu.barrier_wait(st_ready.at[0])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_smem, st_out.at[head, pl.ds(0, DK), pl.ds(vblk * SV, SV)])
        if store_wait == "before":
          plgpu.wait_smem_to_gmem(0)
      sync(2)
      if not early:
        fetch_o()

      @pl.when(has_o)
      def _():
        for t in range(o_tiles):
          plgpu.barrier_wait(o_ready.at[t])
      if store_wait == "end":
        plgpu.wait_smem_to_gmem(0)
      if barriers:
        reset_barriers(arrive, done, ctas, 2)

    @pl.when(wg == 1)
    def _memory():
      @pl.when(has_st)
      def _():
        plgpu.copy_gmem_to_smem(st_ref.at[head, pl.ds(0, DK), pl.ds(vblk * SV, SV)], st_smem, st_ready.at[0])

      def fetch(s, slot):
        u, kt = c + (s // kb) * ctas, lax.rem(s, kb)
        src = (win_ref.at[u, pl.ds(kt * tile_k, tile_k)] if slabs
               else win_ref.at[pl.ds(kt * tile_k, tile_k), pl.ds(u * UNIT_IN, UNIT_IN)])
        plgpu.copy_gmem_to_smem(src, ring.at[slot], ready.at[slot])
      _stream(fetch, mine, stages, (free,))
      if early:
        fetch_o()

  def tiled(cols):  # bf16 tiles [8, cols], swizzled over their 2 * cols-byte rows
    return dict(transforms=(plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(2 * cols)))

  return plgpu.kernel(
      body, out_type=(jax.ShapeDtypeStruct((ctas, 128), jnp.float32), jax.ShapeDtypeStruct(state.shape, state.dtype)),
      scratch_types=[plgpu.SMEM((stages, tile_k, UNIT_IN), w_in.dtype, **tiled(UNIT_IN)),
                     plgpu.SMEM((o_tiles, TILE_O, UNIT_O), w_o.dtype, **tiled(UNIT_O)),
                     plgpu.SMEM((DK, SV), state.dtype),
                     plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                     plgpu.Barrier(num_barriers=o_tiles), plgpu.Barrier(num_barriers=1)],
      grid=(ctas,), grid_names=("cta",), num_threads=2, thread_name="wg")(x, w_in, w_o, state)


def to_slabs(w, unit):
  """[K, N] -> [N / unit, K, unit]: each unit of ``unit`` columns as one contiguous block."""
  K, N = w.shape
  return w.reshape(K, N // unit, unit).transpose(1, 0, 2)


def xla_layer(x, w_in, w_o):
  """The products a GDN decode layer runs today, without the mixer and norms: x + (x @ in_proj)[v] @ o_proj."""
  y = x @ w_in
  return x + y[:, 2 * H * DK:2 * H * DK + HV] @ w_o


def stream_chain(x, wins, wos, states, **cfg):
  outs = []
  for w_in, w_o, st in zip(wins[cfg.get("slabs", False)], wos[cfg.get("slabs", False)], states):
    o, s = layer_stream(x, w_in, w_o, st, **cfg)
    outs.append(s)
    x = x + o[0, :1].astype(x.dtype)  # keeps the launches in order, as a decode step's layers are
  return x, outs


CONFIGS = [dict(tile_k=tk, stages=st, ctas=132, early=e, barriers=b, store_wait=w)
           for tk, st in ((128, 6), (256, 4))
           for e, b, w in ((True, True, "end"), (True, True, "before"), (False, True, "end"), (True, False, "end"))]
CONFIGS += [dict(c, slabs=True) for c in CONFIGS if c["store_wait"] == "end" and c["early"]]

if __name__ == "__main__":
  args = [jax.ShapeDtypeStruct((2, D), jnp.bfloat16), jax.ShapeDtypeStruct((D, N_IN), jnp.bfloat16),
          jax.ShapeDtypeStruct((HV, D), jnp.bfloat16), jax.ShapeDtypeStruct((H, DK, DV), jnp.float32)]
  if "--lower" in sys.argv:
    from pallas_kernels import _compat
    slab_args = args[:1] + [jax.ShapeDtypeStruct((N_IN // UNIT_IN, D, UNIT_IN), jnp.bfloat16),
                            jax.ShapeDtypeStruct((D // UNIT_O, HV, UNIT_O), jnp.bfloat16)] + args[3:]
    for cfg in CONFIGS:
      with _compat.compiled():
        jax.jit(functools.partial(layer_stream, **cfg)).trace(*(slab_args if cfg.get("slabs") else args)).lower(
            lowering_platforms=("cuda",))
      print("lowered", cfg, flush=True)
    sys.exit()
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "probe_TBps": read_probe_tbps(), "L": L}
  print(res, flush=True)
  keys = jax.random.split(jax.random.key(0), 3 * L + 1)
  wins = [(jax.random.normal(keys[i], (D, N_IN), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  wos = [(jax.random.normal(keys[L + i], (HV, D), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  states = [jax.random.normal(keys[2 * L + i], (H, DK, DV), jnp.float32) for i in range(L)]
  x = jax.random.normal(keys[-1], (2, D), jnp.float32).astype(jnp.bfloat16)
  nbytes = (D * N_IN + HV * D) * 2 + 2 * H * DK * DV * 4
  res["MB_per_layer"] = nbytes / 1e6
  res["floor_us"] = nbytes / res["probe_TBps"] / 1e6

  def xla_chain(x, wins, wos):
    for a, b in zip(wins, wos):
      x = xla_layer(x, a, b)
    return x
  fx = jax.jit(xla_chain)
  timers = {"xla_products": lambda: pipelined_seconds(fx, x, wins, wos) / L}
  both_wins = {False: wins, True: [to_slabs(w, UNIT_IN) for w in wins]}  # keyed by ``slabs``
  both_wos = {False: wos, True: [to_slabs(w, UNIT_O) for w in wos]}
  for cfg in CONFIGS:
    f = jax.jit(functools.partial(stream_chain, **cfg))
    _, outs = f(x, both_wins, both_wos, states)
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(outs, states))
    print(cfg, "state copied exactly:", same, flush=True)
    res.setdefault("state_copied_exactly", {})[str(cfg)] = same
    timers[str(cfg)] = lambda f=f: pipelined_seconds(f, x, both_wins, both_wos, states) / L
  res["rounds_us"], res["median_us"] = interleaved_rounds(timers)
  print(f"{nbytes / 1e6:.1f} MB per layer, floor {res['floor_us']:.2f} us at the probe", flush=True)
  json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gdn_layer_stream.json"), "w"), indent=1)
