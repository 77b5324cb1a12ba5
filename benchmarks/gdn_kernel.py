"""Gated delta rule on one GPU: correctness, then ours (Pallas GPU) vs flash-linear-attention vs our XLA backend.

One device call (fla 0.4.0 wheels carried in .wheels/, see PERFORMANCE.md):
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/gdn_kernel.py --out $OUT
  (--long '' skips T=131072, --no-fla skips fla, --xla adds our XLA backend; --smoke: tiny shapes on CPU, interpret
  mode, no fla: checks that the script runs end to end.)
Order: correctness (bf16, T=2000, every A/B config vs the fp32 recurrence), then the A/B of the Pallas GPU versions
(`pallas_gpu` flags, CONFIGS: v3 = the default (caller's layout, q/k normalised by one Triton kernel, gate columns
formed inside prep, prep on whole [64 x 64] matrices with the inverse by doubling in TF32, serial passes with 3
Triton stages), v3_tiles = prep on [16 x 16] tiles (runs 13-18), v3_subst / v3_run12 = tiles with the diagonal
ones by substitution (run 12's prep), and also the gate columns from XLA (run 12's default), v3_xla_gates = the
gate columns from XLA, v3_grad_kernel / v3_grad_xla = the gradient kernel's gate columns summed inside it / with
m, seg arrays, v3_zero_state = no zeroed initial-state array, v3_qk_rows128/256 = the q/k norm kernel's rows per
program, v3_xla_qk_norm / v3_ieee / v3_tf32x3 / v3_prep_w8 / v3_xla_layout / v3_kernel_norm / v3_serial_s2 / v2 /
v3_bv64 = earlier defaults and candidates;
--configs picks, default DEFAULT_AB) forward and forward+backward at each length, then fla, then T=131072 (default
version), then each kernel stage of the default path (and the candidates) jitted alone at T=8192.
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
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import plotting  # noqa: E402  (benchmarks/plotting.py)
from timing import pipelined_seconds  # noqa: E402  (benchmarks/timing.py)

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule import chunk as gdn_chunk
from pallas_kernels.gated_delta_rule import chunk_math as cm
from pallas_kernels.gated_delta_rule import qk_norm
from pallas_kernels.gated_delta_rule import (chunk_gated_delta_rule, naive_recurrent_gated_delta_rule,
                                             pallas_gpu)

B, H, K, V = 1, 16, 128, 256
REPS, INNER = 5, 10  # bench_jax defaults (--smoke: 1, 1)

# Pallas GPU versions compared in one run (module flags of pallas_gpu, read when a function is traced).
_V3 = dict(FUSED_PREP=True, SPLIT_GRADS=True, NATIVE_LAYOUT=True, KERNEL_L2NORM=False, QK_NORM_KERNEL=True, BV=32,
           SERIAL_STAGES=3, INVERSE_PRECISION="tf32", PREP_WARPS=4, KERNEL_GATES=True, DIAG_INVERSE="doubling",
           GRAD_GATES="xla_gam", KERNEL_ZERO_STATE=False, PREP_DENSE=True)
CONFIGS = {
    "v2": dict(_V3, SPLIT_GRADS=False),
    "v3": dict(_V3),  # the default configuration
    "v3_xla_gates": dict(_V3, KERNEL_GATES=False),  # gam, m, seg, h0 formed by XLA
    "v3_grad_kernel": dict(_V3, GRAD_GATES="kernel"),  # the gradient kernel sums g itself (run 13's v3)
    "v3_grad_xla": dict(_V3, GRAD_GATES="xla"),  # XLA's cumsum and m/seg arrays for the gradient kernel
    "v3_zero_state": dict(_V3, KERNEL_ZERO_STATE=True),  # no initial state array: the serial passes start from 0
    "v3_subst": dict(_V3, PREP_DENSE=False, DIAG_INVERSE="substitution"),  # tiles, diagonal ones by substitution
    "v3_tiles": dict(_V3, PREP_DENSE=False),  # prep on [16 x 16] tiles: the default of runs 13-18
    "v3_prep_dense_w8": dict(_V3, PREP_WARPS=8),
    "v3_qk_rows128": {**_V3, "qk_norm.ROWS": 128},  # rows per program of the q/k norm kernel (64 by default)
    "v3_qk_rows256": {**_V3, "qk_norm.ROWS": 256},
    # the default of runs 12 and 13
    "v3_run12": dict(_V3, KERNEL_GATES=False, PREP_DENSE=False, DIAG_INVERSE="substitution"),
    "v3_xla_qk_norm": dict(_V3, QK_NORM_KERNEL=False),  # q/k normalised by XLA's fusions: the default until run 12
    "v3_ieee": dict(_V3, INVERSE_PRECISION="ieee"),  # prep's inverse on the FMA units: the default until run 10
    "v3_tf32x3": dict(_V3, INVERSE_PRECISION="tf32x3"),  # three TF32 passes
    "v3_prep_w8": dict(_V3, PREP_WARPS=8),
    "v3_xla_layout": dict(_V3, NATIVE_LAYOUT=False),  # XLA transposes to heads-first: the default until run 9
    "v3_kernel_norm": dict(_V3, KERNEL_L2NORM=True),  # q/k L2 norm and scale inside the kernels
    "v3_serial_s2": dict(_V3, SERIAL_STAGES=2),  # serial passes with 2 Triton stages: the default until run 8
    "v3_bv64": dict(_V3, BV=64),  # serial passes in 64-column programs: the default until run 6
}
DEFAULT_AB = ("v3", "v3_zero_state")  # --configs default
FWD_SAME_AS = {"v3_xla_layout": "v2"}  # identical forward kernels: timed once


@contextlib.contextmanager
def gpu_flags(**flags):
  """Module constants set while a config is traced: `pallas_gpu` flags, or "qk_norm.NAME" for the q/k norm kernel."""
  mod = lambda n: (qk_norm, n.split(".", 1)[1]) if n.startswith("qk_norm.") else (pallas_gpu, n)
  old = {n: getattr(*mod(n)) for n in flags}
  for n, x in flags.items():
    setattr(*mod(n), x)
  try:
    yield
  finally:
    for n, x in old.items():
      setattr(*mod(n), x)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(seed, T, dtype=jnp.bfloat16, resets=False, correlated=False):
  """Random inputs; `correlated`: keys of one head share a direction (cosine ~0.9 between tokens), which makes the
  chunk's triangular system (I + L) far from the identity."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (B, T, H, K), dtype)
  k = jax.random.normal(ks[1], (B, T, H, K), jnp.float32)
  if correlated:
    k = 3.0 * jax.random.normal(ks[6], (B, 1, H, K), jnp.float32) + k
  k = k.astype(dtype)
  v = jax.random.normal(ks[2], (B, T, H, V), dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H), jnp.float32) - 2.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H), jnp.float32)).astype(dtype)
  seg = jnp.cumsum(jax.random.uniform(ks[5], (B, T)) < 0.01, axis=1).astype(jnp.int32) if resets else None
  return (q, k, v, g, beta), seg


def bench_jax(fn, args, reps=None, inner=None):
  """Milliseconds per call: median over ``reps`` groups of ``inner`` back-to-back calls."""
  reps, inner = reps or REPS, inner or INNER
  return pipelined_seconds(fn, *args, calls=inner, groups=reps, warmup=1) * 1e3


def compiled_peak(comp):
  try:
    ma = comp.memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    return None


def correctness(report, dtypes=(jnp.bfloat16,), configs=("v3",), T=1000):
  """Ours vs the fp32 recurrence (run under highest matmul precision): with resets and an initial state and random
  keys for every config, then for the first config correlated keys, and plain inputs (no segment ids, no initial
  state: the path where the kernels stand in for the mask arrays)."""
  cases = [(d, kind) for d in dtypes for kind in ("random", "correlated", "plain")]
  for dtype, kind in cases:
    tols = {jnp.dtype(jnp.float32): 1e-3, jnp.dtype(jnp.bfloat16): 2e-2}
    tol = tols[jnp.dtype(dtype)]
    plain = kind == "plain"
    (q, k, v, g, beta), seg = inputs(1, T, dtype, resets=not plain, correlated=kind == "correlated")
    h0 = None if plain else jax.random.normal(jax.random.PRNGKey(9), (B, H, K, V), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda *a: naive_recurrent_gated_delta_rule(*a, initial_state=h0, output_final_state=True,
                                                                segment_ids=seg))(*map(f32, (q, k, v, g, beta)))
      do = jax.random.normal(jax.random.PRNGKey(3), ref[0].shape, jnp.float32)

      def ref_loss(*a):
        o, s = naive_recurrent_gated_delta_rule(*a, initial_state=h0, output_final_state=True, segment_ids=seg)
        return jnp.sum(o * do) + jnp.sum(s)
      gref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3, 4)))(*map(f32, (q, k, v, g, beta)))

    def loss(*a):
      o, s = chunk_gated_delta_rule(*a, initial_state=h0, output_final_state=True, segment_ids=seg,
                                    backend="pallas_gpu")
      return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s)
    for config in configs if kind == "random" else configs[:1]:
      try:
        with gpu_flags(**CONFIGS[config]):  # traced (first call) inside: the flags select the kernels
          o, s = jax.jit(lambda *a: chunk_gated_delta_rule(*a, initial_state=h0, output_final_state=True,
                                                           segment_ids=seg, backend="pallas_gpu"))(q, k, v, g, beta)
          gr = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2, 3, 4)))(q, k, v, g, beta)
      except Exception as e:  # noqa: BLE001  (recorded; the other configs go on)
        report.append({"config": config, "keys": kind, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(f"correctness {config} failed: {report[-1]['error']}", flush=True)
        continue
      errs = {"o": rel(o, ref[0]), "state": rel(s, ref[1])}
      errs.update({f"d{n}": rel(a, b) for n, a, b in zip("q k v g beta".split(), gr, gref)})
      ok = all(np.isfinite(e) and e <= tol for e in errs.values())
      report.append({"backend": "pallas_gpu", "config": config, "dtype": jnp.dtype(dtype).name, "T": T, "tol": tol,
                     "keys": kind, "ok": ok, **errs})
      print(f"correctness {config:14s} {jnp.dtype(dtype).name:8s} {kind:10s} ok={ok} " +
            " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)


def compile_case(T, backend, fwd_bwd, config=None):
  """(compiled executable, args, compile seconds) for ours/XLA forward or forward+backward at length T; `config`
  names the Pallas GPU version (CONFIGS)."""
  with gpu_flags(**CONFIGS[config]) if config else contextlib.nullcontext():
    return _compile_case(T, backend, fwd_bwd)


def _compile_case(T, backend, fwd_bwd):
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

def stage_times(T, out=None, left=lambda: 1e9):
  """Where our time goes: each stage of the default path's custom VJP jitted alone (bf16, T tokens), then variants.

  Fills and returns `out` (stage -> ms, or a string saying why not); stops early when `left()` (seconds) runs low.
  The default path: XLA normalises and scales q, k in [B, T, H, K] and forms the gate columns (v3_xla_inputs), then
  prep, the forward state pass (with O), the backward's states-only pass (+ V'), its reverse pass (+ dV') and the
  gradient kernel, all reading and writing the caller's layout.
  """
  out = {} if out is None else out
  C = 64
  args, _ = inputs(0, T)
  sc = K ** -0.5

  def stage(name, fn, *a):
    if left() < 15:
      raise TimeoutError(f"{left():.0f} s left")
    f = jax.jit(fn)
    try:
      res = f(*a)
      out[name] = bench_jax(f, a)
    except Exception as e:  # noqa: BLE001
      out[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
      print(f"stage {name} {out[name]}", flush=True)
      raise
    print(f"stage {name}: {out[name]:.3f} ms", flush=True)
    return res

  def v3():
    qr, kr, vr, gr, br = args
    qn, kn = stage("v3_qk_norm", lambda q, k: qk_norm.normalise(q, k, sc, True), qr, kr)
    # the default path (KERNEL_GATES): the kernels take g and beta as given, no resets, no initial state
    g4, b4 = gr[..., None], br[..., None]
    prep_args = (qn, kn, vr, g4, b4, None, None)
    prep = lambda *a: pallas_gpu.prep_v3(*a, chunk_size=C, scale=None, l2norm=False, cumsum=True)
    pre = stage("v3_prep", prep, *prep_args)
    fwd = lambda p: pallas_gpu.forward_v3(p, None, heads=H, need_o=True, o_dtype=vr.dtype, chunk_size=C)[:2]
    stage("v3_fwd_state", fwd, pre)
    h0 = jnp.zeros((B * H, K, V), jnp.float32)
    stage("v3_fwd_state_h0_array", lambda p, h: pallas_gpu.forward_v3(p, h, heads=H, need_o=True, o_dtype=vr.dtype,
                                                                      chunk_size=C)[:2], pre, h0)
    states = lambda p: pallas_gpu.forward_v3(p, None, heads=H, need_o=False, store=True, chunk_size=C)[1:]
    hT, h, vn = stage("v3_fwd_states_only_store", states, pre)
    do = vr
    dh, _, dvn = stage("v3_bwd_state", lambda p, d, s: pallas_gpu.backward_state_v3(p, d, s, chunk_size=C),
                       pre, do, hT)
    stage("v3_grads_kernel_gates", lambda *x: pallas_gpu.grads_v3(*x, chunk_size=C, cumsum=True),
          pre["a"], qn, kn, vr, g4, b4, None, None, h, dh, vn, dvn, do)
    # run 12's inputs: XLA forms the gate columns, prep reads them
    xla_inputs = lambda g, b: ((cm.chunk_cumsum(g.astype(jnp.float32)[..., None], C),
                                b.astype(jnp.float32)[..., None]) + gdn_chunk._segments(None, B, T, C))
    gam4, beta4, m3, seg3 = stage("v3_xla_inputs", xla_inputs, gr, br)
    stage("v3_grads", lambda *x: pallas_gpu.grads_v3(*x, chunk_size=C),
          pre["a"], qn, kn, vr, gam4, b4, m3, seg3, h, dh, vn, dvn, do)
    stage("v3_prep_xla_gates", lambda *a: pallas_gpu.prep_v3(*a, chunk_size=C, scale=None, l2norm=False),
          qn, kn, vr, gam4, beta4, m3, seg3)
    ctx.update(prep=prep, prep_args=prep_args)

  def variants():  # each variant traced afresh (the module constants are read when traced)
    for name, flags in (("v3_prep_tiles", dict(PREP_DENSE=False)),
                        ("v3_prep_tiles_subst", dict(PREP_DENSE=False, DIAG_INVERSE="substitution"))):
      with gpu_flags(**flags):
        try:
          stage(name, lambda *x: ctx["prep"](*x), *ctx["prep_args"])
        except TimeoutError:
          raise
        except Exception:  # noqa: BLE001  (recorded; the other stages go on)
          pass

  ctx = {}
  for part in (v3, variants):
    if part is variants and not ctx:
      continue
    try:
      part()
    except Exception as e:  # noqa: BLE001
      print(f"stages {part.__name__} stopped: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return out


# ---------------------------------------------------------------- report

def table(report):
  info = report["info"]
  gb = lambda x: f"{x / 2**30:.2f}" if x else "-"
  fmt = lambda t: f"{t:.3f}" if t else "-"
  cfgs = list(info.get("configs", {}))
  lines = [f"\n{info['device']}  JAX {info['jax']}",
           "A/B of the Pallas GPU versions (ms; v3 = the default; v3_xla_layout's forward is v2's; best = the fastest "
           "config, speed-up = default / best; peak of the best):",
           "| T | mode | " + " | ".join(f"{c} ms" for c in cfgs) + " | best | default/best | best peak GB |",
           "|---|---|" + "---|" * (len(cfgs) + 3)]
  for T in sorted(report["timing"]):
    r = report["timing"][T]
    for mode in ("fwd", "fwdbwd"):
      get = lambda c: r.get(f"{c}_{mode}_ms") or (r.get(f"{FWD_SAME_AS[c]}_{mode}_ms") if mode == "fwd" and
                                                   c in FWD_SAME_AS else None)
      ts = [r.get(f"{c}_{mode}_ms") for c in cfgs]
      if not any(ts):
        continue
      best = min((c for c in cfgs if get(c)), key=get)
      base = get("v3")
      lines.append(f"| {T} | {mode} | " + " | ".join(fmt(t) for t in ts) + f" | {best} | "
                   f"{f'{base / get(best):.2f}' if base else '-'} | {gb(r.get(f'{best}_{mode}_peak'))} |")
  lines += ["ours (default version) vs fla and the XLA backend:",
            "| T | mode | ours ms | fla ms | xla ms | fla/ours | xla/ours | ours peak GB | fla peak GB | xla peak GB |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for T in sorted(report["timing"]):
    r = report["timing"][T]
    for mode in ("fwd", "fwdbwd"):
      o, fl, x = (r.get(f"{n}_{mode}_ms") for n in ("ours", "fla", "xla"))
      ratio = lambda t: f"{t / o:.2f}" if (t and o) else "-"
      lines.append(f"| {T} | {mode} | {fmt(o)} | {fmt(fl)} | {fmt(x)} | {ratio(fl)} | {ratio(x)} | "
                   f"{gb(r.get(f'ours_{mode}_peak'))} | {gb(r.get(f'fla_{mode}_peak'))} | "
                   f"{gb(r.get(f'xla_{mode}_peak'))} |")
  st = report.get("stages") or {}
  if st:
    lines += ["stages (ms, each jitted alone):", "| stage | ms |", "|---|---|"]
    lines += [f"| {n} | {fmt(t) if isinstance(t, float) else t} |" for n, t in st.items()]
  return "\n".join(lines)


def plot(report, out):
  panels = {f"GDN {mode}": {name: [(int(T), r[f"{name}_{mode}_ms"]) for T, r in report["timing"].items()
                                  if r.get(f"{name}_{mode}_ms")] for name in ("ours", "fla", "xla")}
            for mode in ("fwd", "fwdbwd")}
  plotting.time_vs_length(os.path.join(out, "gdn_kernel.png"), panels,
                          f"B=1 H=16 K=128 V=256 bf16, {report['info']['device']}", xlabel="T")


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
  global B, H, K, V, REPS, INNER
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--lengths", default="8192,32768")
  ap.add_argument("--long", default="131072", help="lengths run last (default version only), if time remains "
                                                   "('' for none)")
  ap.add_argument("--budget", type=float, default=340.0, help="seconds; the table prints by then regardless")
  ap.add_argument("--configs", default=",".join(DEFAULT_AB),
                  help="Pallas GPU versions to A/B, any of CONFIGS (default: the default and the version-4 candidates)")
  ap.add_argument("--stages", type=int, default=8192, help="T of the per-stage timings (0: none)")
  ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention")
  ap.add_argument("--xla", action="store_true", help="also time our XLA backend")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode on CPU, no fla")
  ap.add_argument("--fla-worker", action="store_true")
  ap.add_argument("--flags", default="/tmp/gdn_flags")
  a = ap.parse_args()
  lengths = [int(t) for t in a.lengths.split(",") if t]
  longs = [int(t) for t in a.long.split(",") if t]
  configs = [c for c in a.configs.split(",") if c]
  corr_T = 2000
  if a.smoke:
    B, H, K, V = 1, 2, 32, 32
    REPS = INNER = 1
    lengths, longs, corr_T, a.stages, a.no_fla = [128, 256], [], 130, 256, True
    a.budget = max(a.budget, 1500.0)  # interpret mode on CPU: minutes for every config and stage
  os.makedirs(a.out, exist_ok=True)
  if a.fla_worker:
    return fla_worker(lengths + longs, a.out, a.flags)
  t0 = time.time()
  left = lambda: t0 + a.budget - time.time()
  dev = jax.devices()[0]
  info = {"device": dev.device_kind, "jax": jax.__version__, "shape": dict(B=B, H=H, K=K, V=V),
          "bv": pallas_gpu.BV, "grad_bk": pallas_gpu.GRAD_BK, "grad_bv": pallas_gpu.GRAD_BV,
          "grad_loop": pallas_gpu.GRAD_LOOP, "grad_warps": pallas_gpu.GRAD_WARPS,
          "configs": {c: CONFIGS[c] for c in configs}, "default": "v3", "smoke": a.smoke}
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
  worker = None
  if not a.no_fla:
    worker = subprocess.Popen([sys.executable, "-u", __file__, "--fla-worker", "--out", a.out, "--flags", a.flags,
                               "--lengths", a.lengths, "--long", a.long], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  flag = lambda n: os.path.exists(os.path.join(a.flags, n))
  fla_running = lambda: worker is not None and worker.poll() is None

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

  section("correctness bf16", 60,
          lambda: correctness(report["correctness"], configs=[c for c in configs if c != "v2"], T=corr_T))
  compiled = {}

  def compile_one(T, key, backend, fb, config=None):
    try:
      comp, args, sec = compile_case(T, backend, fb, config)
    except Exception as e:  # noqa: BLE001
      report["timing"][T][key + "_error"] = f"{type(e).__name__}: {str(e)[:800]}"
      print(f"compile {key} T={T} failed: {report['timing'][T][key + '_error']}", flush=True)
      return
    compiled[(T, key)] = (comp, args)
    report["compile_s"][f"{key}_{T}"] = round(sec, 1)
    report["timing"][T][key + "_peak"] = compiled_peak(comp)
    print(f"compiled {key} T={T} in {sec:.1f} s", flush=True)

  def compile_ab(T, cfgs):  # A/B: each Pallas GPU version, forward and forward+backward
    for fb in (False, True):
      for c in cfgs:
        if not fb and FWD_SAME_AS.get(c) in cfgs:
          continue
        compile_one(T, f"{c}_{'fwdbwd' if fb else 'fwd'}", "pallas_gpu", fb, c)

  def time_all():
    for (T, key), (comp, args) in sorted(compiled.items()):
      big = T > max(lengths)
      report["timing"][T][key + "_ms"] = bench_jax(comp, args, *((3, 5) if big and not a.smoke else ()))
      print(f"time {key} T={T}: {report['timing'][T][key + '_ms']:.3f} ms", flush=True)
      del compiled[(T, key)]
    default = next((n for n, flags in CONFIGS.items()
                    if all(getattr(pallas_gpu, k, None) == v for k, v in flags.items())), "v3")
    for T, r in report["timing"].items():  # "ours" = the default version, else the newest that ran
      for mode in ("fwd", "fwdbwd"):
        for c in (default, "v3", "v3_xla_layout", "v2"):
          c = FWD_SAME_AS.get(c, c) if mode == "fwd" and f"{c}_fwd_ms" not in r else c
          if f"{c}_{mode}_ms" in r:
            r[f"ours_{mode}_ms"], r[f"ours_{mode}_peak"], r[f"ours_{mode}_config"] = (
                r[f"{c}_{mode}_ms"], r.get(f"{c}_{mode}_peak"), c)
            break

  for T in lengths:
    section(f"compile A/B T={T}", 40, lambda: compile_ab(T, configs))
  if a.xla:
    for T in lengths:
      section(f"compile xla T={T}", 60, lambda: [compile_one(T, f"xla_{m}", "xla", m == "fwdbwd")
                                                 for m in ("fwd", "fwdbwd")])
  wait_until = time.time() + max(0.0, left() - 150)
  while fla_running() and not flag("fla_warm") and time.time() < wait_until:
    time.sleep(0.5)
  info["fla_idle_while_ours_timed"] = worker is None or flag("fla_warm") or not fla_running()
  print(f"fla warm: {flag('fla_warm')}, {left():.0f} s left", flush=True)
  section("time A/B", 10, time_all)
  compiled.clear()
  print(table(report), flush=True)
  open(os.path.join(a.flags, "fla_go"), "w").close()
  while fla_running() and not flag("fla_done") and left() > 60:
    time.sleep(0.5)
  if fla_running():
    worker.kill()
  for T in longs:
    report["timing"][T] = {"T": T}

    def run_long():
      compile_ab(T, ["v3" if "v3" in configs else configs[0]])
      time_all()
    section(f"ours T={T}", 45, run_long)
  if a.stages:
    section(f"stages T={a.stages}", 60, lambda: stage_times(a.stages, report["stages"], lambda: left() - 20))
    print(f"stages (ms) at T={a.stages}:", {k: (round(v, 3) if isinstance(v, float) else v)
                                            for k, v in report["stages"].items()}, flush=True)
  finalize(report, a.out, "complete")


if __name__ == "__main__":
  main()
