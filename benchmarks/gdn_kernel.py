"""Gated delta rule on one GPU: correctness, then ours (Pallas GPU) vs flash-linear-attention vs our XLA backend.

One device call (fla 0.4.0 wheels carried in .wheels/, see PERFORMANCE.md):
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/gdn_kernel.py --out $OUT
Shapes: B=1, H=16, K=128, V=256, bf16 operands, fp32 state, q/k L2-norm inside. Times are medians of timed
repeats after warm-up (JAX: wall clock around block_until_ready of a batch of calls; torch: CUDA events).
Peak memory: JAX from the compiled executable's memory analysis (arguments + outputs + temporaries); fla from
torch.cuda.max_memory_allocated over one call, inputs included. Writes gdn_kernel.json and gdn_kernel.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule import chunk as gdn_chunk
from pallas_kernels.gated_delta_rule import (chunk_gated_delta_rule, naive_recurrent_gated_delta_rule,
                                             pallas_gpu)

B, H, K, V = 1, 16, 128, 256


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(seed, T, dtype=jnp.bfloat16, resets=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H), jnp.float32) - 2.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32)).astype(dtype)
  seg = jnp.cumsum(jax.random.uniform(ks[5], (B, T)) < 0.01, axis=1).astype(jnp.int32) if resets else None
  return (q, k, v, g, beta), seg


def bench_jax(fn, args, reps=5, inner=10):
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / inner * 1e3)
  return statistics.median(ts)


def jax_peak(fn, args):
  try:
    ma = fn.lower(*args).compile().memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def correctness(report):
  """Ours (bf16 and f32 inputs) and the XLA backend vs the fp32 recurrence, with resets and an initial state."""
  T = 1000
  for dtype, tol in ((jnp.float32, 1e-3), (jnp.bfloat16, 2e-2)):
    (q, k, v, g, beta), seg = inputs(1, T, dtype, resets=True)
    h0 = jax.random.normal(jax.random.PRNGKey(9), (B, H, K, V), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda *a: naive_recurrent_gated_delta_rule(*a, initial_state=h0, output_final_state=True,
                                                                segment_ids=seg))(*map(f32, (q, k, v, g, beta)))
      do = jax.random.normal(jax.random.PRNGKey(3), ref[0].shape, jnp.float32)

      def ref_loss(*a):
        o, s = naive_recurrent_gated_delta_rule(*a, initial_state=h0, output_final_state=True, segment_ids=seg)
        return jnp.sum(o * do) + jnp.sum(s)
      gref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3, 4)))(*map(f32, (q, k, v, g, beta)))
    for backend in ("pallas_gpu", "xla"):
      fn = jax.jit(lambda *a: chunk_gated_delta_rule(*a, initial_state=h0, output_final_state=True,
                                                     segment_ids=seg, backend=backend))
      o, s = fn(q, k, v, g, beta)

      def loss(*a):
        o, s = chunk_gated_delta_rule(*a, initial_state=h0, output_final_state=True, segment_ids=seg,
                                      backend=backend)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
      gr = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
      errs = {"o": rel(o, ref[0]), "state": rel(s, ref[1])}
      errs.update({f"d{n}": rel(a, b) for n, a, b in zip("q k v g beta".split(), gr, gref)})
      ok = all(np.isfinite(e) and e <= tol for e in errs.values())
      report.append({"backend": backend, "dtype": jnp.dtype(dtype).name, "T": T, "tol": tol, "ok": ok, **errs})
      print(f"correctness {backend:10s} {jnp.dtype(dtype).name:8s} ok={ok} " +
            " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)


def ours_and_xla(T, backend, fwd_bwd, args):
  f = lambda *a: chunk_gated_delta_rule(*a, backend=backend)[0]
  if not fwd_bwd:
    fn = jax.jit(f)
    return fn, args
  do = jax.random.normal(jax.random.PRNGKey(7), (B, T, H, V), jnp.bfloat16)
  fn = jax.jit(lambda *a: jax.vjp(f, *a[:5])[1](a[5]))
  return fn, args + (do,)


def bench_fla(T, seed):
  import torch
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr
  import triton
  dev = "cuda"
  gen = torch.Generator(device=dev).manual_seed(seed)
  r = lambda *s: torch.randn(*s, device=dev, generator=gen)
  q, k = r(B, T, H, K).bfloat16(), r(B, T, H, K).bfloat16()
  v = r(B, T, H, V).bfloat16()
  g = -torch.nn.functional.softplus(r(B, T, H) - 2.0)
  beta = torch.sigmoid(r(B, T, H)).bfloat16()
  do = r(B, T, H, V).bfloat16()
  res = {}
  call = lambda *a: fla_gdr(*a, use_qk_l2norm_in_kernel=True)[0]
  with torch.no_grad():
    call(q, k, v, g, beta)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call(q, k, v, g, beta)
    torch.cuda.synchronize()
    res["fwd_peak"] = torch.cuda.max_memory_allocated()
    res["fwd_ms"] = triton.testing.do_bench(lambda: call(q, k, v, g, beta), warmup=50, rep=300,
                                            return_mode="median")
  leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

  def fb():
    o = call(*leaves)
    return torch.autograd.grad(o, leaves, do)
  fb()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  fb()
  torch.cuda.synchronize()
  res["fwdbwd_peak"] = torch.cuda.max_memory_allocated()
  res["fwdbwd_ms"] = triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median")
  del q, k, v, g, beta, do, leaves
  torch.cuda.empty_cache()
  return res


def stage_times(T, args):
  """Where our time goes: each stage of the custom VJP jitted alone (bf16, T tokens)."""
  C = 64
  prep = jax.jit(lambda *a: gdn_chunk._prepare(*a, K ** -0.5, None, True, None, C))
  p = prep(*args)
  q, k, v, gam, beta, h0, m, seg = p
  out = {"prepare": bench_jax(prep, args)}
  wu = jax.jit(lambda *a: pallas_gpu.wu(*a, chunk_size=C))
  w, u = wu(k, v, gam, beta, m, seg)
  out["wu"] = bench_jax(wu, (k, v, gam, beta, m, seg))
  fwd = jax.jit(lambda *a: pallas_gpu.forward(*a, False, chunk_size=C)[:2])
  out["fwd_state"] = bench_jax(fwd, (q, k, w, u, gam, m, seg, h0))
  fwds = jax.jit(lambda *a: pallas_gpu.forward(*a, True, chunk_size=C))
  o, hT, h = fwds(q, k, w, u, gam, m, seg, h0)
  out["fwd_state_store"] = bench_jax(fwds, (q, k, w, u, gam, m, seg, h0))
  bst = jax.jit(lambda *a: pallas_gpu.backward_state(*a, chunk_size=C))
  dh, _ = bst(q, k, w, o, gam, m, seg, hT)
  out["bwd_state"] = bench_jax(bst, (q, k, w, o, gam, m, seg, hT))
  gr = jax.jit(lambda *a: pallas_gpu.grads(*a, chunk_size=C))
  out["grads"] = bench_jax(gr, (q, k, v, gam, beta, m, seg, h, dh, o))
  return out


def one_stage(name, T):
  """Compile and time one Pallas GPU stage alone (isolates compile-time or run-time trouble)."""
  C = 64
  args, _ = inputs(0, T)
  q, k, v, gam, beta, h0, m, seg = jax.jit(lambda *a: gdn_chunk._prepare(*a, K ** -0.5, None, True, None, C))(*args)
  w = jnp.zeros_like(k) + k
  u = v
  h = jnp.zeros((B * H, T // C, K, V), q.dtype)
  stages = {
      "wu": (lambda *a: pallas_gpu.wu(*a, chunk_size=C), (k, v, gam, beta, m, seg)),
      "fwd": (lambda *a: pallas_gpu.forward(*a, False, chunk_size=C)[:2], (q, k, w, u, gam, m, seg, h0)),
      "fwd_store": (lambda *a: pallas_gpu.forward(*a, True, chunk_size=C), (q, k, w, u, gam, m, seg, h0)),
      "bwd_state": (lambda *a: pallas_gpu.backward_state(*a, chunk_size=C), (q, k, w, v, gam, m, seg, h0)),
      "grads": (lambda *a: pallas_gpu.grads(*a, chunk_size=C), (q, k, v, gam, beta, m, seg, h, h, v)),
  }
  fn, fargs = stages[name]
  t0 = time.perf_counter()
  comp = jax.jit(fn).lower(*fargs).compile()
  t1 = time.perf_counter()
  print(f"stage {name} T={T} compile {t1 - t0:.1f}s", flush=True)
  print(f"stage {name} T={T} run {bench_jax(comp, fargs, reps=3, inner=5):.3f} ms", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--stage", default=None)
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--lengths", default="8192,32768,131072")
  ap.add_argument("--skip-correctness", action="store_true")
  a = ap.parse_args()
  if a.stage:
    return one_stage(a.stage, int(a.lengths.split(",")[0]))
  dev = jax.devices()[0]
  info = {"device": dev.device_kind, "jax": jax.__version__, "bv": pallas_gpu.BV}
  print(info, flush=True)
  report = {"info": info, "correctness": [], "timing": [], "stages": {}}
  if not a.skip_correctness:
    try:
      correctness(report["correctness"])
    except Exception as e:  # noqa: BLE001
      print(f"correctness failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
  lengths = [int(t) for t in a.lengths.split(",")]
  try:
    import fla  # noqa: F401
    have_fla = True
  except ImportError as e:
    print("fla not importable:", e)
    have_fla = False
  for T in lengths:
    args, _ = inputs(0, T)
    row = {"T": T}
    for backend in ("pallas_gpu", "xla"):
      if backend == "xla" and T > 32768:
        continue
      for fb in (False, True):
        key = f"{'ours' if backend == 'pallas_gpu' else 'xla'}_{'fwdbwd' if fb else 'fwd'}"
        try:
          fn, fargs = ours_and_xla(T, backend, fb, args)
          row[key + "_ms"] = bench_jax(fn, fargs)
          row[key + "_peak"] = jax_peak(fn, fargs)
        except Exception as e:  # noqa: BLE001
          print(f"{key} T={T} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    if have_fla:
      try:
        row.update({f"fla_{k}": v for k, v in bench_fla(T, T).items()})
      except Exception as e:  # noqa: BLE001
        print(f"fla T={T} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    if T == 32768:
      try:
        report["stages"] = stage_times(T, args)
        print("stages (ms) at T=32768:", {k: round(v, 3) for k, v in report["stages"].items()}, flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"stages failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    report["timing"].append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "gdn_kernel.json"), "w") as f:
    json.dump(report, f, indent=1)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
      for name in ("ours", "fla", "xla"):
        pts = [(r["T"], r[f"{name}_{mode}_ms"]) for r in report["timing"] if f"{name}_{mode}_ms" in r]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=name)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("T")
      ax.set_ylabel("ms")
      ax.set_title(f"GDN {mode}, B=1 H=16 K=128 V=256 bf16, {info['device']}")
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "gdn_kernel.png"), dpi=100)
  except Exception as e:  # noqa: BLE001
    print("plot failed:", e)
  # table last
  print(f"\n{info['device']}  JAX {info['jax']}")
  print("| T | mode | ours ms | fla ms | xla ms | fla/ours | xla/ours | ours peak GB | fla peak GB |")
  print("|---|---|---|---|---|---|---|---|---|")
  gb = lambda x: f"{x / 2**30:.2f}" if x else "-"
  for r in report["timing"]:
    for mode in ("fwd", "fwdbwd"):
      o, fl, x = (r.get(f"{n}_{mode}_ms") for n in ("ours", "fla", "xla"))
      fmt = lambda t: f"{t:.3f}" if t else "-"
      ratio = lambda t: f"{t / o:.2f}" if (t and o) else "-"
      print(f"| {r['T']} | {mode} | {fmt(o)} | {fmt(fl)} | {fmt(x)} | {ratio(fl)} | {ratio(x)} | "
            f"{gb(r.get(f'ours_{mode}_peak'))} | {gb(r.get(f'fla_{mode}_peak'))} |")


if __name__ == "__main__":
  main()
