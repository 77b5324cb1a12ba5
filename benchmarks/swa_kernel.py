"""Sliding-window attention on one GPU: our Pallas kernels (Triton; Mosaic GPU on Hopper) vs cuDNN (windowed and
full causal).

InfiniteVL's SWA shape: Hq=16, Hkv=2, D=128, window 8192, bf16. One run does, in order:
1. correctness of every implementation against the float32 dense reference (fresh random
   inputs, forward and all three gradients, packed and unpacked, T not a block multiple);
2. a small block-size sweep of our kernel at T=65536 (forward and backward separately);
3. timings (median of ``--reps`` after warm-up) at T in {32768, 65536, 131072}, forward and
   forward+backward, for ours (Triton, and Mosaic GPU on sm90) / cuDNN window / cuDNN full causal;
4. a packed batch (4 documents) where only ours and the XLA reference can run.
Writes ``$OUT/swa_kernel.json`` and ``$OUT/swa_kernel.png``; prints the table last.

    python benchmarks/swa_kernel.py            # on the GPU machine
    python benchmarks/swa_kernel.py --mosaic-ab --lengths 65536   # Mosaic GPU variants, and the backward alone
    python benchmarks/swa_kernel.py --plot-from results/swa_kernel.json   # redraw a saved run's plot
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import plotting  # noqa: E402  (benchmarks/plotting.py)

from pallas_kernels.sliding_window_attention import attention_reference  # noqa: E402
from pallas_kernels.sliding_window_attention import sliding_window_attention  # noqa: E402
from pallas_kernels.sliding_window_attention import flash_mosaic  # noqa: E402
from pallas_kernels.sliding_window_attention.flash_gpu import flash_attention  # noqa: E402
from pallas_kernels.sliding_window_attention.reference import attention_blockwise  # noqa: E402

HQ, HKV, D, W = 16, 2, 128, 8192


def rel(a, b):
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def inputs(key, b, t, dtype=jnp.bfloat16):
  kq, kk, kv, kd = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, HQ, D), dtype)
  k = jax.random.normal(kk, (b, t, HKV, D), dtype)
  v = jax.random.normal(kv, (b, t, HKV, D), dtype)
  do = jax.random.normal(kd, (b, t, HQ, D), dtype)
  return q, k, v, do


def fwd_and_bwd(fn):
  """jitted forward, and jitted forward+backward returning (dq, dk, dv)."""
  f = jax.jit(fn)

  def fb(q, k, v, do):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(do)

  return f, jax.jit(fb)


def timeit(f, *args, reps=10, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts) * 1e3), float(np.min(ts) * 1e3), float(np.max(ts) * 1e3)


def window_flops(t, window, b=1):
  """Matmul FLOPs of the forward: 2 products of 2*D per visible (query, key) pair."""
  n = np.arange(t)
  pairs = np.minimum(n + 1, window if window else t).sum()
  return float(4 * D * HQ * b * pairs)


def impls(window, seg=None, cfg=None):
  cfg = cfg or {}
  out = {"ours": lambda q, k, v: flash_attention(q, k, v, window=window, segment_ids=seg, **cfg)}
  if seg is None and flash_mosaic.supported():
    out["ours_mosaic"] = lambda q, k, v: flash_mosaic.flash_attention(q, k, v, window=window)
  if seg is None:
    out["cudnn_window"] = lambda q, k, v: sliding_window_attention(
        q, k, v, window=window, backend="cudnn")
    out["cudnn_full"] = lambda q, k, v: sliding_window_attention(
        q, k, v, window=None, backend="cudnn")
  else:
    out["xla_blockwise"] = lambda q, k, v: attention_blockwise(
        q, k, v, window=window, segment_ids=seg)
  return out


def correctness(log):
  key = jax.random.PRNGKey(0)
  cases = [(1, 4096, 1024, False), (2, 4000, 700, True), (1, 3000, None, False)]
  for i, (b, t, w, packed) in enumerate(cases):
    q, k, v, do = inputs(jax.random.fold_in(key, i), b, t)
    seg = None
    if packed:
      seg = jnp.asarray(np.repeat(np.arange(4), -(-t // 4))[None, :t].repeat(b, 0), jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)
    ref = lambda q, k, v: attention_reference(q, k, v, window=w, segment_ids=seg)
    o_ref, vjp_ref = jax.vjp(ref, f32(q), f32(k), f32(v))
    g_ref = vjp_ref(f32(do))
    for name, fn in impls(w, seg).items():
      if name == "cudnn_full" and w is not None:
        continue
      try:
        o, vjp = jax.vjp(jax.jit(fn), q, k, v)
        g = vjp(do)
        errs = [rel(o, o_ref)] + [rel(a, b_) for a, b_ in zip(g, g_ref)]
        finite = bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
        ok = finite and max(errs) < 2e-2
        log.append(dict(kind="check", case=(b, t, w, packed), impl=name, errors=errs, ok=ok))
        print(f"check b={b} t={t} w={w} packed={packed} {name:14s} "
              f"o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e} "
              f"{'OK' if ok else 'FAIL'}", flush=True)
      except Exception as e:  # keep going: one failure must not cost the whole run
        traceback.print_exc()
        log.append(dict(kind="check", case=(b, t, w, packed), impl=name, error=repr(e)[:500]))


def sweep(log, t, reps):
  q, k, v, do = inputs(jax.random.PRNGKey(1), 1, t)
  fwd_cfgs = [dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
              dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
              dict(block_q=64, block_k=64, num_warps=4, num_stages=3)]
  bwd_cfgs = [dict(bwd_block_q=64, bwd_block_k=128, bwd_num_warps=8, bwd_num_stages=2),
              dict(bwd_block_q=32, bwd_block_k=128, bwd_num_warps=4, bwd_num_stages=2),
              dict(bwd_block_q=64, bwd_block_k=64, bwd_num_warps=4, bwd_num_stages=2)]
  best_f, best_b = (None, 1e9), (None, 1e9)
  for c in fwd_cfgs:
    try:
      f = jax.jit(lambda q, k, v: flash_attention(q, k, v, window=W, **c))
      ms = timeit(f, q, k, v, reps=reps)[0]
      print(f"sweep fwd {c}: {ms:.2f} ms", flush=True)
      log.append(dict(kind="sweep_fwd", cfg=c, ms=ms))
      if ms < best_f[1]:
        best_f = (c, ms)
    except Exception as e:
      traceback.print_exc()
      log.append(dict(kind="sweep_fwd", cfg=c, error=repr(e)[:500]))
  for c in bwd_cfgs:
    try:
      cc = dict(best_f[0] or {}, **c)
      _, fb = fwd_and_bwd(lambda q, k, v: flash_attention(q, k, v, window=W, **cc))
      ms = timeit(fb, q, k, v, do, reps=reps)[0]
      print(f"sweep fwd+bwd {cc}: {ms:.2f} ms", flush=True)
      log.append(dict(kind="sweep_bwd", cfg=cc, ms=ms))
      if ms < best_b[1]:
        best_b = (c, ms)
    except Exception as e:
      traceback.print_exc()
      log.append(dict(kind="sweep_bwd", cfg=c, error=repr(e)[:500]))
  return dict(best_f[0] or {}, **(best_b[0] or {}))


def tune(t, reps):
  """Variants of our kernel side by side at one length, with cuDNN windowed as the yardstick;
  then the decode kernel (attend_to_cache) against its XLA reference."""
  from pallas_kernels.sliding_window_attention import flash_gpu
  from pallas_kernels.sliding_window_attention.cache import (attend_to_cache_pallas,
                                                             attend_to_cache_reference)
  q, k, v, do = inputs(jax.random.PRNGKey(11), 1, t)
  res = []
  cud = impls(W)["cudnn_window"]
  f, fb = fwd_and_bwd(cud)
  res.append(("cudnn_window fwd", timeit(f, q, k, v, reps=reps)[0]))
  res.append(("cudnn_window fwd+bwd", timeit(fb, q, k, v, do, reps=reps)[0]))
  print(res, flush=True)
  base = dict(block_q=128, block_k=64, num_warps=8, num_stages=3)
  fwd_variants = {
      "base 128x64 w8 s3": base,
      "128x128 w8 s3": dict(base, block_k=128),
      "128x64 w8 s4": dict(base, num_stages=4),
      "heads_fastest": dict(base, heads_fastest=True),
      "fold_scale": dict(base, fold_scale=True),
      "heads_fastest+fold_scale": dict(base, heads_fastest=True, fold_scale=True),
  }
  for name, c in fwd_variants.items():
    try:
      ms = timeit(jax.jit(lambda q, k, v: flash_attention(q, k, v, window=W, **c)), q, k, v,
                  reps=reps)[0]
      res.append((f"ours fwd {name}", ms))
      print(res[-1], flush=True)
    except Exception:
      traceback.print_exc()
  o, lse = jax.jit(lambda q, k, v: flash_gpu._fwd(q, k, v, None, scale=D ** -0.5, window=W,
                                                  interpret=False, **base))(q, k, v)
  bwd_variants = {"dkv 64x64 w4 s2": (64, 64, 4, 2), "dkv 64x64 w4 s3": (64, 64, 4, 3),
                  "dkv 64x128 w8 s3": (64, 128, 8, 3), "dkv 128x64 w8 s2": (128, 64, 8, 2),
                  "dkv 64x128 w4 s2": (64, 128, 4, 2)}
  for name, (bq, bk, nw, ns) in bwd_variants.items():
    try:
      g = jax.jit(lambda q, k, v, o, lse, do: flash_gpu._bwd(
          q, k, v, None, o, lse, do, scale=D ** -0.5, window=W, block_q=bq, block_k=bk,
          num_warps=nw, num_stages=ns, interpret=False))
      res.append((f"ours bwd only {name}", timeit(g, q, k, v, o, lse, do, reps=reps)[0]))
      print(res[-1], flush=True)
    except Exception:
      traceback.print_exc()
  # decode / chunk against an 8191-slot ring buffer
  length = W - 1
  for c in (1, 64):
    kc = jax.random.split(jax.random.PRNGKey(c), 6)
    qc = jax.random.normal(kc[0], (1, c, HQ, D), jnp.bfloat16)
    kk = jax.random.normal(kc[1], (1, c, HKV, D), jnp.bfloat16)
    vv = jax.random.normal(kc[2], (1, c, HKV, D), jnp.bfloat16)
    ck = jax.random.normal(kc[3], (1, length, HKV, D), jnp.bfloat16)
    cv = jax.random.normal(kc[4], (1, length, HKV, D), jnp.bfloat16)
    p0 = 20000
    cpos = (p0 - length + jnp.arange(length, dtype=jnp.int32))[None]
    cpos = jnp.roll(cpos, 1234, axis=1)  # ring order
    qpos = (p0 + jnp.arange(c, dtype=jnp.int32))[None]
    args = (qc, kk, vv, ck, cv, cpos, qpos)
    try:
      decode_case(res, c, args)
    except Exception:
      traceback.print_exc()
  print(f"\ntuning at T={t}, median ms")
  for name, ms in res:
    print(f"| {name} | {ms:.3f} |")
  return res


def decode_case(res, c, args):
  from pallas_kernels.sliding_window_attention.cache import (attend_to_cache_pallas,
                                                             attend_to_cache_reference)
  ref = jax.jit(lambda *a: attend_to_cache_reference(*a, window=W))
  ker = jax.jit(lambda *a: attend_to_cache_pallas(*a, window=W))
  err = rel(ker(*args), attend_to_cache_reference(*[x.astype(jnp.float32) if x.dtype ==
                                                    jnp.bfloat16 else x for x in args],
                                                  window=W))
  res.append((f"attend_to_cache C={c} pallas (err {err:.1e})", timeit(ker, *args, reps=50)[0]))
  res.append((f"attend_to_cache C={c} xla reference", timeit(ref, *args, reps=50)[0]))
  print(res[-2:], flush=True)


MOSAIC_VARIANTS = {
    "mosaic": dict(),  # the defaults: forward 64 x 2 rows x 128 keys, 2 stages, ping-pong; Mosaic backward
    "mosaic_bwd_triton": dict(backward="triton", bwd_block_q=64, bwd_block_k=128, bwd_stages=3),
    "mosaic_group": dict(bwd_group_dq=True),
    "mosaic_r232": dict(bwd_registers=(232, 40)),
    "mosaic_r224": dict(bwd_registers=(224, 56)),
}


def mosaic_ab(args):
  """The Mosaic GPU forward (flash_mosaic) beside our Triton kernel and cuDNN windowed: correctness of every
  variant first (forward and gradients against the float32 reference), then forward and forward+backward times."""
  variants = {n: MOSAIC_VARIANTS[n] for n in args.mosaic_variants.split(",")}
  res = dict(meta=dict(device=jax.devices()[0].device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                       variants=variants), checks=[], rows=[])
  out_path = os.path.join(os.environ.get("OUT", "."), "swa_mosaic.json")

  def save():  # after every timing: a run cut short keeps what it measured
    with open(out_path, "w") as fh:
      json.dump(res, fh, indent=1)

  key = jax.random.PRNGKey(11)
  f32 = lambda x: x.astype(jnp.float32)
  for i, (b, t, w) in enumerate([(1, 4096, 1024), (2, 4000, 700), (1, 3000, None), (1, 1024, 8192)]):
    q, k, v, do = inputs(jax.random.fold_in(key, i), b, t)
    ref = lambda q, k, v: attention_reference(q, k, v, window=w)
    o_ref, vjp_ref = jax.vjp(ref, f32(q), f32(k), f32(v))
    g_ref = vjp_ref(f32(do))
    for name, cfg in variants.items():
      try:
        fn = jax.jit(lambda q, k, v, cfg=cfg: flash_mosaic.flash_attention(q, k, v, window=w, **cfg))
        o, vjp = jax.vjp(fn, q, k, v)
        errs = [rel(o, o_ref)] + [rel(a, b_) for a, b_ in zip(vjp(do), g_ref)]
        ok = bool(jnp.all(jnp.isfinite(f32(o)))) and max(errs) < 2e-2
        res["checks"].append(dict(case=(b, t, w), impl=name, errors=errs, ok=ok))
        print(f"check b={b} t={t} w={w} {name:24s} o {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
              f"dv {errs[3]:.2e} {'OK' if ok else 'FAIL'}", flush=True)
      except Exception as e:
        traceback.print_exc()
        res["checks"].append(dict(case=(b, t, w), impl=name, error=repr(e)[:800]))
  for t in [int(x) for x in args.lengths.split(",")]:
    q, k, v, do = inputs(jax.random.PRNGKey(t), 1, t)
    fns = dict(impls(W))
    for name in ["cudnn_full", "ours_mosaic"] + (["ours"] if args.no_triton else []):
      fns.pop(name, None)
    for name, cfg in variants.items():
      fns[name] = lambda q, k, v, cfg=cfg: flash_mosaic.flash_attention(q, k, v, window=W, **cfg)
    for name, fn in fns.items():
      f, fb = fwd_and_bwd(fn)
      modes = (("fwd", f, (q, k, v)),) if name in args.fwd_only.split(",") else \
          (("fwd", f, (q, k, v)), ("fwd+bwd", fb, (q, k, v, do)))
      for mode, g, a in modes:
        try:
          med, lo, hi = timeit(g, *a, reps=args.reps)
        except Exception as e:
          traceback.print_exc()
          res["rows"].append(dict(t=t, impl=name, mode=mode, error=repr(e)[:500]))
          continue
        res["rows"].append(dict(t=t, impl=name, mode=mode, ms=med, ms_min=lo, ms_max=hi))
        print(f"T={t:6d} {name:24s} {mode:7s} {med:9.3f} ms", flush=True)
        save()
  if args.no_bwd_alone:
    save()
    return
  # the backward alone at the first length, on the forward's saved o and lse: Triton's two kernels, the Mosaic kernel,
  # and the Mosaic kernel without dQ's product and reduction (a probe: dQ stays zero)
  from pallas_kernels.sliding_window_attention import flash_gpu
  t = int(args.lengths.split(",")[0])
  q, k, v, do = inputs(jax.random.PRNGKey(t), 1, t)
  scale = D ** -0.5
  o, lse = jax.jit(lambda q, k, v: flash_mosaic._fwd(q, k, v, scale=scale, window=W, block_q=64, block_k=128,
                                                     stages=2, pingpong=True))(q, k, v)
  bwds = {
      "triton_bwd": lambda: jax.jit(lambda *a: flash_gpu._bwd(*a[:3], None, *a[3:], scale=scale, window=W, block_q=64,
                                                             block_k=128, num_warps=8, num_stages=3,
                                                             interpret=False)),
  }
  # the Mosaic backward's variants, and dQ's path in parts: without it, without its reduction, only the reduction
  variants = {"": {}, "_dq_buffers2": dict(dq_buffers=2), "_stages3": dict(stages=3),
              "_group_dq": dict(group_dq=True), "_r232": dict(registers=(232, 40)),
              **{f"_dq_{probe}": dict(dq_mode=probe) for probe in ("none", "store", "reduce_only")}}
  for suffix, kw in variants.items():
    kw = dict(dict(block_q=64, block_k=64, stages=2), **kw)
    bwds["mosaic_bwd" + suffix] = lambda kw=kw: jax.jit(lambda *a: flash_mosaic._bwd(*a, scale=scale, window=W, **kw))
  for name, make in bwds.items():
    try:
      med, lo, hi = timeit(make(), q, k, v, o, lse, do, reps=args.reps)
      res["rows"].append(dict(t=t, impl=name, mode="bwd", ms=med, ms_min=lo, ms_max=hi))
      print(f"T={t:6d} {name:24s} bwd     {med:9.3f} ms", flush=True)
    except Exception as e:
      traceback.print_exc()
      res["rows"].append(dict(t=t, impl=name, mode="bwd", error=repr(e)[:500]))
  save()


LABELS = {"ours": "ours (Triton)", "ours_mosaic": "ours (Mosaic GPU)", "cudnn_window": "cuDNN window",
          "cudnn_full": "cuDNN full causal"}


def plot(rows, meta, path):
  """Time against sequence length, forward and forward+backward, one line per implementation."""
  panels = {mode: {label: [(r["t"], r["ms"]) for r in rows if r["impl"] == name and r["mode"] == mode and "ms" in r]
                   for name, label in LABELS.items()} for mode in ("fwd", "fwd+bwd")}
  plotting.time_vs_length(path, panels, f"Sliding-window attention, Hq 16 Hkv 2 D 128 W 8192 bf16, {meta['device']}, "
                                        f"JAX {meta['jax']}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--lengths", default="32768,65536,131072")
  ap.add_argument("--no-sweep", action="store_true")
  ap.add_argument("--tune", action="store_true", help="only the variant/decode comparison")
  ap.add_argument("--mosaic-ab", action="store_true", help="only the Mosaic GPU forward's variants vs ours and cuDNN")
  ap.add_argument("--mosaic-variants", default=",".join(MOSAIC_VARIANTS))
  ap.add_argument("--no-bwd-alone", action="store_true", help="skip the backward-alone timings")
  ap.add_argument("--no-triton", action="store_true", help="leave the Triton kernel out of the --mosaic-ab timings")
  ap.add_argument("--fwd-only", default="", help="implementations timed forward only (comma-separated)")
  ap.add_argument("--plot-from", default=None, help="only redraw the plot of a saved swa_kernel.json")
  args = ap.parse_args()
  if args.plot_from:
    with open(args.plot_from) as fh:
      saved = json.load(fh)
    plot(saved["rows"], saved["meta"], os.path.splitext(args.plot_from)[0] + ".png")
    return
  if args.mosaic_ab:
    mosaic_ab(args)
    return
  if args.tune:
    print(dict(device=jax.devices()[0].device_kind, jax=jax.__version__), flush=True)
    res = tune(65536, args.reps)
    with open(os.path.join(os.environ.get("OUT", "."), "swa_tune.json"), "w") as fh:
      json.dump(res, fh, indent=1)
    return
  out_dir = os.environ.get("OUT", ".")
  dev = jax.devices()[0]
  meta = dict(device=dev.device_kind, jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
              shape=dict(Hq=HQ, Hkv=HKV, D=D, window=W, dtype="bfloat16"), reps=args.reps)
  print(meta, flush=True)
  log = []
  correctness(log)
  cfg = {} if args.no_sweep else sweep(log, 65536, args.reps)
  meta["cfg"] = cfg
  print("chosen config:", cfg, flush=True)

  rows = []
  lengths = [int(x) for x in args.lengths.split(",")]
  for t in lengths:
    q, k, v, do = inputs(jax.random.PRNGKey(t), 1, t)
    for name, fn in impls(W, None, cfg).items():
      f, fb = fwd_and_bwd(fn)
      for mode, g, a in (("fwd", f, (q, k, v)), ("fwd+bwd", fb, (q, k, v, do))):
        try:
          med, lo, hi = timeit(g, *a, reps=args.reps)
        except Exception as e:
          traceback.print_exc()
          rows.append(dict(t=t, impl=name, mode=mode, error=repr(e)[:300]))
          continue
        fl = window_flops(t, None if name == "cudnn_full" else W) * (1 if mode == "fwd" else 3.5)
        rows.append(dict(t=t, impl=name, mode=mode, ms=med, ms_min=lo, ms_max=hi,
                         tflops=fl / med / 1e9))
        print(f"T={t:6d} {name:13s} {mode:7s} {med:9.2f} ms  ({fl / med / 1e9:5.0f} TFLOP/s)",
              flush=True)
  # packed: 4 documents of T/4 tokens each; cuDNN cannot take segment ids
  tp = lengths[0]
  q, k, v, do = inputs(jax.random.PRNGKey(7), 1, tp)
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), tp // 4)[None]
  for name, fn in impls(W, seg, cfg).items():
    f, fb = fwd_and_bwd(fn)
    for mode, g, a in (("fwd", f, (q, k, v)), ("fwd+bwd", fb, (q, k, v, do))):
      try:
        med, lo, hi = timeit(g, *a, reps=args.reps)
        rows.append(dict(t=tp, impl=name + "_packed4", mode=mode, ms=med, ms_min=lo, ms_max=hi))
        print(f"packed T={tp} {name:13s} {mode:7s} {med:9.2f} ms", flush=True)
      except Exception as e:
        traceback.print_exc()
        rows.append(dict(t=tp, impl=name + "_packed4", mode=mode, error=repr(e)[:300]))

  with open(os.path.join(out_dir, "swa_kernel.json"), "w") as fh:
    json.dump(dict(meta=meta, rows=rows, log=log), fh, indent=1)
  plot(rows, meta, os.path.join(out_dir, "swa_kernel.png"))

  # the table, last
  get = lambda t, n, m: next((r.get("ms") for r in rows if r["t"] == t and r["impl"] == n
                              and r["mode"] == m), None)
  fmt = lambda x: f"{x:9.2f}" if x is not None else "      n/a"
  print(f"\n{meta['device']}, JAX {meta['jax']}, bf16, Hq=16 Hkv=2 D=128 W=8192, median ms")
  print("| T | mode | ours, Mosaic GPU | ours, Triton | cuDNN window | cuDNN full | Mosaic / cuDNN window |"
        " Triton / cuDNN window |")
  print("|---|---|---|---|---|---|---|---|")
  ratio = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
  for t in lengths:
    for m in ("fwd", "fwd+bwd"):
      a, b, c = get(t, "ours", m), get(t, "cudnn_window", m), get(t, "cudnn_full", m)
      mo = get(t, "ours_mosaic", m)
      print(f"| {t} | {m} | {fmt(mo)} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {ratio(mo, b)} | {ratio(a, b)} |")
  for name in ("ours_mosaic", "ours"):
    for m in ("fwd", "fwd+bwd"):
      a, b = get(lengths[-1], name, m), get(lengths[-2], name, m) if len(lengths) > 1 else None
      if a and b:
        print(f"{name} {m}: time({lengths[-1]}) / time({lengths[-2]}) = {a / b:.2f}")
  for m in ("fwd", "fwd+bwd"):
    a, b = get(tp, "ours_packed4", m), get(tp, "xla_blockwise_packed4", m)
    print(f"packed 4 docs T={tp} {m}: ours {fmt(a)}  xla blockwise {fmt(b)}")


if __name__ == "__main__":
  main()
