"""Gated delta rule on one GPU: correctness, then ours (Pallas GPU) vs flash-linear-attention vs our XLA backend.

One device call (fla 0.4.0 wheels carried in .wheels/, see PERFORMANCE.md):
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/gdn_kernel.py --out $OUT
Shapes: B=1, H=16, K=128, V=256, bf16 operands, fp32 state, q/k L2-norm inside. Times are medians of timed
repeats after warm-up (JAX: wall clock around block_until_ready of a batch of calls; torch: CUDA events).
Peak memory: JAX from the compiled executable's memory analysis (arguments + outputs + temporaries); fla from
torch.cuda.max_memory_allocated over one call, inputs included. Writes gdn_kernel.json and gdn_kernel.png.

Time: fla's first call autotunes (minutes of Triton compiles), so a worker process warms fla up while this process
compiles ours and the XLA backend, then waits idle while ours is timed, and times fla only after. Every section
checks the time left (--budget); a watchdog prints the table of whatever was measured when the budget runs out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
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


def compiled_peak(comp):
  try:
    ma = comp.memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def correctness(report, dtypes=(jnp.bfloat16,), backends=("pallas_gpu",)):
  """Ours vs the fp32 recurrence (run under highest matmul precision), with resets and an initial state, T=1000."""
  T = 1000
  tols = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.bfloat16): 2e-2}
  for dtype in dtypes:
    tol = tols[jnp.dtype(dtype)]
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
    for backend in backends:
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


def compile_case(T, backend, fwd_bwd):
  """(compiled executable, args, compile seconds) for ours/XLA forward or forward+backward at length T."""
  args, _ = inputs(0, T)
  f = lambda *a: chunk_gated_delta_rule(*a, backend=backend)[0]
  if fwd_bwd:
    do = jax.random.normal(jax.random.PRNGKey(7), (B, T, H, V), jnp.bfloat16)
    fn, args = (lambda *a: jax.vjp(f, *a[:5])[1](a[5])), args + (do,)
  else:
    fn = f
  t0 = time.perf_counter()
  comp = jax.jit(fn).lower(*args).compile()
  return comp, args, time.perf_counter() - t0


# ---------------------------------------------------------------- fla (PyTorch), in a worker process

def bench_fla(T, seed):
  import torch
  import triton
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdr
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
  t0 = time.perf_counter()
  with torch.no_grad():
    call(q, k, v, g, beta)
    torch.cuda.synchronize()
  res["fwd_first_call_s"] = time.perf_counter() - t0
  with torch.no_grad():
    torch.cuda.reset_peak_memory_stats()
    call(q, k, v, g, beta)
    torch.cuda.synchronize()
    res["fwd_peak"] = torch.cuda.max_memory_allocated()
    res["fwd_ms"] = triton.testing.do_bench(lambda: call(q, k, v, g, beta), warmup=25, rep=200,
                                            return_mode="median")
  leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

  def fb():
    o = call(*leaves)
    return torch.autograd.grad(o, leaves, do)
  t0 = time.perf_counter()
  fb()
  torch.cuda.synchronize()
  res["fwdbwd_first_call_s"] = time.perf_counter() - t0
  torch.cuda.reset_peak_memory_stats()
  fb()
  torch.cuda.synchronize()
  res["fwdbwd_peak"] = torch.cuda.max_memory_allocated()
  res["fwdbwd_ms"] = triton.testing.do_bench(fb, warmup=25, rep=200, return_mode="median")
  del q, k, v, g, beta, do, leaves
  torch.cuda.empty_cache()
  return res


def fla_worker(lengths, out, flags):
  """Warm fla up (its Triton autotuning happens on the first call; keys do not include T), signal, wait for the
  go-ahead so that no JAX work shares the GPU while fla is timed, then time every length."""
  res = {}
  try:
    import fla  # noqa: F401
    t0 = time.perf_counter()
    res["warmup"] = bench_fla(lengths[0], 1)
    print(f"[fla] warm-up (autotune + compile, T={lengths[0]}) {time.perf_counter() - t0:.1f} s", flush=True)
  except Exception as e:  # noqa: BLE001
    print(f"[fla] failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
  open(os.path.join(flags, "fla_warm"), "w").close()
  while not os.path.exists(os.path.join(flags, "fla_go")):
    time.sleep(0.2)
  for T in lengths:
    try:
      res[str(T)] = bench_fla(T, T)
      print(f"[fla] T={T} {res[str(T)]}", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"[fla] T={T} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
    with open(os.path.join(out, "fla.json"), "w") as f:
      json.dump(res, f, indent=1)
  open(os.path.join(flags, "fla_done"), "w").close()


# ---------------------------------------------------------------- stages

def stage_times(T):
  """Where our time goes: each stage of the custom VJP (version 2) jitted alone (bf16, T tokens)."""
  C = 64
  args, _ = inputs(0, T)
  prep_x = jax.jit(lambda *a: gdn_chunk._prepare(*a, K ** -0.5, None, True, None, C))
  q, k, v, g, beta, h0, m, seg = prep_x(*args)
  gam = gdn_chunk.chunk_cumsum(g, C)
  out = {"xla_prepare": bench_jax(prep_x, args)}
  prep = jax.jit(lambda *a: pallas_gpu.prep(*a, chunk_size=C))
  pre = prep(q, k, v, gam, beta, m, seg)
  out["prep"] = bench_jax(prep, (q, k, v, gam, beta, m, seg))
  fwd = jax.jit(lambda p, h: pallas_gpu.forward_pre(p, h, False, chunk_size=C)[:2])
  out["fwd_state"] = bench_jax(fwd, (pre, h0))
  fwds = jax.jit(lambda p, h: pallas_gpu.forward_pre(p, h, True, need_o=False, chunk_size=C)[1:])
  hT, h = fwds(pre, h0)
  out["fwd_states_only_store"] = bench_jax(fwds, (pre, h0))
  do = v
  bst = jax.jit(lambda p, d, s: pallas_gpu.backward_state_pre(p, d, s, chunk_size=C))
  dh, _ = bst(pre, do, hT)
  out["bwd_state"] = bench_jax(bst, (pre, do, hT))
  gr = jax.jit(lambda a, *x: pallas_gpu.grads(*x, chunk_size=C, a=a))
  out["grads"] = bench_jax(gr, (pre["a"], q, k, v, gam, beta, m, seg, h, dh, do))
  old_bv = pallas_gpu.BV
  try:  # twice the programs for the serial passes (16 heads x 4 blocks of 64 columns leave SMs idle)
    pallas_gpu.BV = 32
    out["fwd_state_bv32"] = bench_jax(jax.jit(lambda p, h: pallas_gpu.forward_pre(p, h, False, chunk_size=C)[:2]),
                                      (pre, h0))
    out["bwd_state_bv32"] = bench_jax(jax.jit(lambda p, d, s: pallas_gpu.backward_state_pre(p, d, s, chunk_size=C)),
                                      (pre, do, hT))
  finally:
    pallas_gpu.BV = old_bv
  return out


# ---------------------------------------------------------------- report

def table(report):
  info = report["info"]
  lines = [f"\n{info['device']}  JAX {info['jax']}",
           "| T | mode | ours ms | fla ms | xla ms | fla/ours | xla/ours | ours peak GB | fla peak GB | xla peak GB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  gb = lambda x: f"{x / 2**30:.2f}" if x else "-"
  fmt = lambda t: f"{t:.3f}" if t else "-"
  for T in sorted(report["timing"]):
    r = report["timing"][T]
    for mode in ("fwd", "fwdbwd"):
      o, fl, x = (r.get(f"{n}_{mode}_ms") for n in ("ours", "fla", "xla"))
      ratio = lambda t: f"{t / o:.2f}" if (t and o) else "-"
      lines.append(f"| {T} | {mode} | {fmt(o)} | {fmt(fl)} | {fmt(x)} | {ratio(fl)} | {ratio(x)} | "
                   f"{gb(r.get(f'ours_{mode}_peak'))} | {gb(r.get(f'fla_{mode}_peak'))} | "
                   f"{gb(r.get(f'xla_{mode}_peak'))} |")
  return "\n".join(lines)


def plot(report, out):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
      for name in ("ours", "fla", "xla"):
        pts = [(T, r[f"{name}_{mode}_ms"]) for T, r in sorted(report["timing"].items())
               if r.get(f"{name}_{mode}_ms")]
        if pts:
          ax.plot(*zip(*pts), marker="o", label=name)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("T")
      ax.set_ylabel("ms")
      ax.set_title(f"GDN {mode}, B=1 H=16 K=128 V=256 bf16\n{report['info']['device']}", fontsize=9)
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gdn_kernel.png"), dpi=100)
  except Exception as e:  # noqa: BLE001
    print("plot failed:", e, flush=True)


_DONE = threading.Lock()


def finalize(report, out, why):
  if not _DONE.acquire(blocking=False):
    return
  report["ended"] = why
  fla_path = os.path.join(out, "fla.json")
  if os.path.exists(fla_path):
    try:
      with open(fla_path) as f:
        fres = json.load(f)
      report["fla"] = fres
      for T, r in report["timing"].items():
        for key, val in fres.get(str(T), {}).items():
          r[f"fla_{key}"] = val
    except Exception as e:  # noqa: BLE001
      print("fla.json unreadable:", e, flush=True)
  with open(os.path.join(out, "gdn_kernel.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  plot(report, out)
  print(f"\nended: {why}; elapsed {time.time() - report['t0']:.0f} s", flush=True)
  print(table(report), flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--lengths", default="8192,32768")
  ap.add_argument("--long", default="131072", help="lengths run last, if time remains ('' for none)")
  ap.add_argument("--budget", type=float, default=385.0, help="seconds; the table prints by then regardless")
  ap.add_argument("--fla-worker", action="store_true")
  ap.add_argument("--flags", default="/tmp/gdn_flags")
  a = ap.parse_args()
  lengths = [int(t) for t in a.lengths.split(",") if t]
  longs = [int(t) for t in a.long.split(",") if t]
  os.makedirs(a.out, exist_ok=True)
  if a.fla_worker:
    return fla_worker(lengths + longs, a.out, a.flags)
  t0 = time.time()
  left = lambda: t0 + a.budget - time.time()
  dev = jax.devices()[0]
  from pallas_kernels.gated_delta_rule import xla as gdn_xla
  info = {"device": dev.device_kind, "jax": jax.__version__, "bv": pallas_gpu.BV, "version": 2,
          "xla_backend_inverse": getattr(gdn_xla._solve_inverse, "__name__", "?")}
  print(info, flush=True)
  report = {"info": info, "t0": t0, "correctness": [], "timing": {T: {"T": T} for T in lengths}, "stages": {},
            "compile_s": {}}
  threading.Thread(target=lambda: (time.sleep(max(a.budget, 1)), finalize(report, a.out, "budget"),
                                   os._exit(0)), daemon=True).start()
  # fla warms up (autotuning: CPU-heavy Triton compiles) in its own process while JAX compiles here.
  os.makedirs(a.flags, exist_ok=True)
  for n in ("fla_warm", "fla_go", "fla_done"):
    if os.path.exists(os.path.join(a.flags, n)):
      os.remove(os.path.join(a.flags, n))
  worker = subprocess.Popen([sys.executable, "-u", __file__, "--fla-worker", "--out", a.out, "--flags", a.flags,
                             "--lengths", a.lengths, "--long", a.long], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  flag = lambda n: os.path.exists(os.path.join(a.flags, n))

  def section(name, need, fn):
    if left() < need:
      print(f"skip {name}: {left():.0f} s left", flush=True)
      return None
    t = time.perf_counter()
    try:
      return fn()
    except Exception as e:  # noqa: BLE001
      print(f"{name} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
      return None
    finally:
      print(f"[{name}] {time.perf_counter() - t:.1f} s, {left():.0f} s left", flush=True)

  section("correctness bf16", 60, lambda: correctness(report["correctness"]))
  compiled = {}

  def compile_all(T, backend):
    for fb in (False, True):
      key = f"{'ours' if backend == 'pallas_gpu' else 'xla'}_{'fwdbwd' if fb else 'fwd'}"
      try:
        comp, args, sec = compile_case(T, backend, fb)
      except Exception as e:  # noqa: BLE001
        if backend == "pallas_gpu" and pallas_gpu.FUSED_PREP:
          print(f"{key} T={T} version 2 failed ({type(e).__name__}: {str(e)[:800]}); using version 1", flush=True)
          pallas_gpu.FUSED_PREP = False
          info["version"] = 1
          comp, args, sec = compile_case(T, backend, fb)
        else:
          raise
      compiled[(T, key)] = (comp, args)
      report["compile_s"][f"{key}_{T}"] = round(sec, 1)
      report["timing"][T][key + "_peak"] = compiled_peak(comp)
      print(f"compiled {key} T={T} in {sec:.1f} s", flush=True)

  for T in lengths:
    section(f"compile ours T={T}", 40, lambda: compile_all(T, "pallas_gpu"))
  for T in lengths:
    section(f"compile xla T={T}", 60, lambda: compile_all(T, "xla"))
  wait_until = time.time() + max(0.0, left() - 150)
  while not flag("fla_warm") and time.time() < wait_until and worker.poll() is None:
    time.sleep(0.5)
  info["fla_idle_while_ours_timed"] = flag("fla_warm") or worker.poll() is not None
  print(f"fla warm: {flag('fla_warm')}, {left():.0f} s left", flush=True)

  def time_all():
    for (T, key), (comp, args) in sorted(compiled.items()):
      report["timing"][T][key + "_ms"] = bench_jax(comp, args)
      print(f"time {key} T={T}: {report['timing'][T][key + '_ms']:.3f} ms", flush=True)
      del compiled[(T, key)]
  section("time ours/xla", 10, time_all)
  compiled.clear()
  open(os.path.join(a.flags, "fla_go"), "w").close()
  while not flag("fla_done") and worker.poll() is None and left() > 60:
    time.sleep(0.5)
  if worker.poll() is None:
    worker.kill()
  section("correctness fp32", 70, lambda: correctness(report["correctness"], dtypes=(jnp.float32,)))
  st = section("stages T=8192", 60, lambda: stage_times(8192))
  if st:
    report["stages"] = st
    print("stages (ms) at T=8192:", {k: round(v, 3) for k, v in st.items()}, flush=True)
  for T in longs:
    report["timing"][T] = {"T": T}

    def run_long():
      compile_all(T, "pallas_gpu")
      for key in ("ours_fwd", "ours_fwdbwd"):
        comp, args = compiled.pop((T, key))
        report["timing"][T][key + "_ms"] = bench_jax(comp, args, reps=3, inner=5)
        print(f"time {key} T={T}: {report['timing'][T][key + '_ms']:.3f} ms", flush=True)
    section(f"ours T={T}", 45, run_long)
  finalize(report, a.out, "complete")


if __name__ == "__main__":
  main()
