"""Does warming L2 with the next product's weight, from the small kernel before it, shorten a decode chain?

At batch 1 a decode step alternates between products that stream a weight and small kernels (norms, mixers,
attention over the ring) that move a few KB and leave the memory system idle. This probe has the residual-add +
RMSNorm kernel (the body of `pallas_kernels.rms_norm`) also issue fire-and-forget L2 prefetches of the product's
weight that follows it, from inline PTX, neither waiting for them nor reading the data:
  * bulk: ``cp.async.bulk.prefetch.L2.global`` (Hopper's bulk copy engine), one request per ``chunk`` bytes;
  * lines: ``prefetch.global.L2`` at every ``chunk`` bytes (128: one per L2 line; 32: one per sector).
The requests are spread over P programs: the kernel's two row programs and more that only prefetch.

Chains of L layers with distinct weights (more bytes than L2 holds), two rows as in the decode step, each layer:
  * "proj D": the norm kernel, then ``h @ W`` with W [D, 2048] (a sliding-window layer's o_proj at D = 2048, a GDN
    layer's at D = 4096), tiled back to D columns;
  * "mlp": the norm kernel, then gate_up [2048, 2 I], SiLU(gate) x up and down [I, 2048] (XLA).
Every chain is timed with none, part or all of the weight asked for; medians of interleaved rounds, us per layer.
"weight-in-L2" repeats one weight in every layer (it stays in L2 after the first): the most warming can give.

    PYTHONPATH=. python3 benchmarks/l2_prefetch_probe.py            # GPU; writes $OUT/l2_prefetch.json if OUT is set
    PYTHONPATH=. python3 benchmarks/l2_prefetch_probe.py --lower    # CPU: lower every setting for CUDA
"""
import argparse, functools, json, os, sys

import jax, jax.numpy as jnp
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(__file__))
from decode_mlp_common import interleaved_rounds, rel_err  # noqa: E402
from timing import pipelined_seconds, read_probe_tbps  # noqa: E402

from pallas_kernels import _compat, rms_norm  # noqa: E402

MB = 1 << 20
I = 11008
EPS = 1e-6


@functools.cache
def _prefetch_primitive():
  """A Pallas Triton primitive ``prefetch(ref, rows)``: one L2 prefetch per row start of ``ref`` ([n, chunk])."""
  from jax._src import core as jax_core
  from jax._src import tree_util
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as triton_lowering
  from jax._src.state import discharge as state_discharge
  from jax._src.state import primitives as state_primitives
  from jax._src.state import types as state_types

  p = jax_core.Primitive("l2_prefetch")
  p.multiple_results = True

  @p.def_effectful_abstract_eval
  def _(*avals, args_tree, bulk):
    return [], {state_types.WriteEffect(0)}  # declared a write, so that tracing keeps it although nothing reads it

  state_discharge.register_discharge_rule(p)(lambda in_avals, out_avals, *a, **k: ((None,) * len(in_avals), []))

  @triton_lowering.register_lowering(p)
  def _(ctx, *flat, args_tree, bulk):
    ref, (indexer,) = args_tree.unflatten(flat)
    ptrs = triton_lowering._compute_pointers_from_indices(ref, ctx.block_infos[0], indexer)
    row_bytes = ctx.avals_in[0].shape[-1] * ctx.avals_in[0].dtype.itemsize
    asm = (f"mov.u32 $0, 0; cp.async.bulk.prefetch.L2.global [$1], {row_bytes};" if bulk
           else "mov.u32 $0, 0; prefetch.global.L2 [$1];")
    i32 = ir.RankedTensorType.get(ir.RankedTensorType(ptrs.type).shape, ir.IntegerType.get_signless(32))
    tt_dialect.elementwise_inline_asm([i32], asm, constraints="=r,l", pure=False, packed_element=1, args=[ptrs])
    return []

  def prefetch(ref, rows, bulk):
    ref_, transforms = state_primitives.get_ref_and_transforms(ref, (rows, 0), "prefetch")
    flat, tree = tree_util.tree_flatten((ref_, transforms))
    p.bind(*flat, args_tree=tree, bulk=bulk)
  return prefetch


def _norm_prefetch_kernel(x_ref, d_ref, w_ref, pf_ref, s_ref, h_ref, *, rows, chunks, bulk):
  pid, programs = pl.program_id(0), pl.num_programs(0)
  per = -(-chunks // programs)
  block = min(1024, 1 << (per - 1).bit_length())
  for first in range(0, per, block):  # this program's rows: pid, pid + P, ... of the weight's first `chunks`
    rows_ = jnp.minimum(pid + programs * (first + jax.lax.iota(jnp.int32, block)), chunks - 1)
    _prefetch_primitive()(pf_ref, rows_, bulk)

  @pl.when(pid < rows)
  def _():
    rms_norm._kernel(x_ref, d_ref, w_ref, s_ref, h_ref, eps=EPS)


def norm_prefetch(x, d, scale, w, setting):
  """The norm kernel with ``setting`` = (MB of w asked for (-1: all), bulk, programs, bytes per request)."""
  mb, bulk, programs, chunk = setting
  R, D = x.shape
  per = chunk // w.dtype.itemsize
  view = w.reshape(-1)[:w.size // per * per].reshape(-1, per)
  chunks = view.shape[0] if mb < 0 else min(view.shape[0], mb * MB // chunk)
  row = pl.BlockSpec((1, D), lambda i: (jnp.minimum(i, R - 1), 0))
  return pl.pallas_call(
      functools.partial(_norm_prefetch_kernel, rows=R, chunks=chunks, bulk=bulk), grid=(max(R, programs),),
      in_specs=[row, row, pl.BlockSpec((1, D), lambda i: (0, 0)), pl.BlockSpec(view.shape, lambda i: (0, 0))],
      out_specs=[row, row], out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
      compiler_params=_compat.triton_params(num_warps=rms_norm.NUM_WARPS, num_stages=1),
      interpret=_compat.gpu_interpret(), name="add_rms_norm_prefetch",
  )(x, d, scale.reshape(1, D), view)


def _norm(x, d, scale, w, setting):
  if setting is None:
    return rms_norm.add_rms_norm_gpu(x, d, scale, EPS)
  return norm_prefetch(x, d, scale, w, setting)


def proj_chain(x, ws, scale, setting):
  d = jnp.zeros_like(x)
  for w in ws:
    x, h = _norm(x, d, scale, w, setting)
    y = jnp.dot(h, w, preferred_element_type=jnp.float32).astype(x.dtype)
    d = jnp.tile(y, (1, x.shape[-1] // y.shape[-1]))  # [D_in, D_out] weights with D_out | D_in
  return x + d


def mlp_chain(x, layers, scale, setting):
  d = jnp.zeros_like(x)
  for wgu, wd in layers:
    x, h = _norm(x, d, scale, wgu, setting)
    y = jnp.dot(h, wgu, preferred_element_type=jnp.float32)
    z = (jax.nn.silu(y[:, :I]) * y[:, I:]).astype(x.dtype)
    d = jnp.dot(z, wd, preferred_element_type=jnp.float32).astype(x.dtype)
  return x + d


def settings(kind):
  """None (the library's kernel), or (MB asked for (-1: all, 0: none), bulk engine, programs, bytes per request)."""
  none = [None, (0, True, 132, 128)]
  if kind == "proj2048":
    return none + [(-1, True, p, 4096) for p in (2, 33, 132)] + [
        (-1, True, 132, 1024), (-1, True, 132, 256), (-1, False, 132, 128), (-1, False, 132, 32),
        (-1, False, 264, 32)]
  if kind == "proj4096":
    return none + [(8, True, 132, 4096), (-1, True, 132, 4096), (-1, True, 132, 256), (-1, False, 132, 32),
                   (8, False, 132, 32)]
  return none + [(mb, True, 132, 4096) for mb in (4, 8, 16)] + [(8, True, 132, 256), (8, False, 132, 32),
                                                                 (16, False, 132, 32)]


def name(setting):
  if setting is None:
    return "none"
  mb, bulk, programs, chunk = setting
  if mb == 0:
    return f"none-{programs}"
  return f"{'all' if mb < 0 else f'{mb}MB'}-{'bulk' if bulk else 'lines'}{chunk}-{programs}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--lower", action="store_true", help="only lower every setting for CUDA (runs on CPU)")
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  key = jax.random.key(0)
  mk = lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(jnp.bfloat16)
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if not args.lower:
    res["probe_TBps"] = read_probe_tbps()
    print(res, flush=True)
  cases = {}
  for kind, L in (("proj2048", 16), ("proj4096", 16), ("mlp", 4)):
    ks = jax.random.split(jax.random.fold_in(key, L), 2 * L + 1)
    if kind == "mlp":
      ws = [(mk(ks[2 * i], (2048, 2 * I)), mk(ks[2 * i + 1], (I, 2048))) for i in range(L)]
      chain, x = mlp_chain, mk(ks[-1], (2, 2048))
    else:
      D = int(kind[4:])
      ws = [mk(ks[i], (D, 2048)) for i in range(L)]
      chain, x = proj_chain, mk(ks[-1], (2, D))
    scale = jnp.ones((x.shape[-1],), jnp.bfloat16)
    fns = {name(st): jax.jit(functools.partial(chain, setting=st)) for st in settings(kind)}
    if args.lower:
      with _compat.compiled():
        for n, f in fns.items():
          f.trace(x, ws, scale).lower(lowering_platforms=("cuda",))
          print(kind, n, "lowered", flush=True)
      continue
    ref = fns["none"](x, ws, scale)
    errs = {n: rel_err(f(x, ws, scale), ref) for n, f in fns.items()}
    timers = {n: (lambda f=f: pipelined_seconds(f, x, ws, scale) / L) for n, f in fns.items()}
    if kind != "mlp":
      same, f0 = [ws[0]] * L, fns["none"]
      timers["weight-in-L2"] = lambda: pipelined_seconds(f0, x, same, scale) / L
    rounds, med = interleaved_rounds(timers, args.rounds)
    cases[kind] = {"layers": L, "errors_vs_none": errs, "median_us_per_layer": med, "rounds": rounds}
    print(kind, "errors", errs, flush=True)
  res["cases"] = cases
  if os.environ.get("OUT") and not args.lower:
    with open(os.path.join(os.environ["OUT"], "l2_prefetch.json"), "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
