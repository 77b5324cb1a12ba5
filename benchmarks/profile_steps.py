"""Where the time goes: device-kernel profiles of the decode step, a prefill chunk, a streamed frame and a stage-II
training step of the full-size model (random weights, bf16), summarised on the machine that ran them.

Each section calls its jitted step until a call compiles nothing (at least twice), times a few calls, then runs a few
more under ``jax.profiler`` with a Perfetto trace; the trace's device events are grouped by (device line, kernel/op
name) and the largest are written to ``$OUT/profile_<section>.json`` together with the wall time per step. Summaries,
not traces, come back: a trace of a training step is tens of MB.

The inference sections run the inference path (``engine.prepare``: per-block decoder weights): ``decode`` (one token
at a 4096-token context), ``prefill`` (one ``--chunk`` chunk), ``stream`` (one 448 px frame per program) and
``stream_k<K>`` for every K > 1 of ``--frames-per-step`` (K frames per program; the per-frame time is the wall time
over K). ``swa_cache`` times ``attend_to_cache`` alone, XLA reference vs Pallas kernel, at chunk lengths 1 to 4096
against a full 8191-slot ring (what ``PALLAS_CACHE_MIN_CHUNK`` decides between), without a trace.

    python benchmarks/profile_steps.py --sections decode,prefill,stream,swa_cache,train --frames-per-step 1,8
    python benchmarks/profile_steps.py --tiny --sections decode,prefill,stream,swa_cache,train   # CPU smoke run
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference as bench_inf  # noqa: E402  (benchmarks/inference.py)
import train_step as bench_train  # noqa: E402  (benchmarks/train_step.py)

from infinitevl_jax.config import infinitevl_4b, tiny_infinitevl  # noqa: E402
from infinitevl_jax.inference import engine  # noqa: E402


def summarise_trace(log_dir: str, top: int = 40) -> dict:
    """Device-side busy time per (line, name) from the Perfetto trace under ``log_dir``."""
    paths = glob.glob(os.path.join(log_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no perfetto trace under {log_dir}"}
    with gzip.open(sorted(paths)[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    busy = collections.defaultdict(float)
    count = collections.Counter()
    lines = collections.defaultdict(float)
    on_device = lambda proc: "GPU" in proc or "TPU" in proc or "/device" in proc
    any_device = any(on_device(p) for p in procs.values())  # CPU runs: every line (host threads)
    for e in events:
        if e.get("ph") != "X":
            continue
        proc = procs.get(e["pid"], "")
        if any_device and not on_device(proc):
            continue
        line = f"{proc} | {threads.get((e['pid'], e.get('tid')), e.get('tid'))}"
        key = (line, e.get("name", "?"))
        busy[key] += float(e.get("dur", 0.0))
        count[key] += 1
        lines[line] += float(e.get("dur", 0.0))
    out = {"lines_us": dict(sorted(lines.items(), key=lambda kv: -kv[1]))}
    by_line = collections.defaultdict(list)
    for (line, name), us in busy.items():
        by_line[line].append((us, count[(line, name)], name))
    out["top"] = {line: [{"us": round(us, 1), "n": n, "name": name[:160]} for us, n, name in sorted(v, reverse=True)[:top]]
                  for line, v in by_line.items()}
    return out


def profiled(name: str, fn, reps: int, out_dir: str, per: int = 1) -> dict:
    """Calls ``fn()`` (returns something to block on) until a call compiles nothing (at least twice: a step fed its own
    outputs may compile once more than a step fed fresh inputs), then ``reps`` times timed and ``reps`` times under
    the profiler. ``per``: items (frames) per call, for the per-item time."""
    warmup = bench_inf.warm(fn)
    t0 = time.perf_counter()
    for _ in range(reps):
        r = fn()
    jax.block_until_ready(r)
    wall = (time.perf_counter() - t0) / reps
    log_dir = tempfile.mkdtemp(prefix=f"prof_{name}_")
    try:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        for _ in range(reps):
            r = fn()
        jax.block_until_ready(r)
        jax.profiler.stop_trace()
        summary = summarise_trace(log_dir)
    except Exception as e:  # a profiler that cannot start must not lose the wall times
        summary = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res = {"section": name, "reps": reps, "warmup_calls": warmup, "wall_ms_per_rep": wall * 1e3,
           "items_per_rep": per, "wall_ms_per_item": wall * 1e3 / per, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, **summary}
    with open(os.path.join(out_dir, f"profile_{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{name}: {wall * 1e3:.2f} ms per rep" + (f" = {wall * 1e3 / per:.2f} ms per item ({per} per rep, "
                                                    f"{per / wall:.1f} per s)" if per > 1 else ""), flush=True)
    for line, us in list(res.get("lines_us", {}).items())[:6]:
        print(f"  {us / reps / 1e3:9.3f} ms/rep  {line}", flush=True)
        for row in res["top"][line][:12]:
            print(f"      {row['us'] / reps / 1e3:8.3f} ms  x{row['n'] // reps:<4} {row['name'][:110]}", flush=True)
    return res


def swa_cache_section(args, out_dir: str) -> dict:
    """``attend_to_cache`` alone at InfiniteVL's SWA shape (Hq 16, Hkv 2, D 128, window 8192, bf16; tiny: the tiny
    model's), XLA reference vs Pallas kernel, chunks of 1 to 4096 queries against a full ring."""
    from pallas_kernels.sliding_window_attention import PALLAS_CACHE_MIN_CHUNK, attend_to_cache, choose_cache_backend
    from pallas_kernels.sliding_window_attention.cache import launch_config

    hq, hkv, d, window, dtype = (4, 2, 16, 16, jnp.float32) if args.tiny else (16, 2, 128, 8192, jnp.bfloat16)
    L = window - 1
    gpu = jax.devices()[0].platform == "gpu"
    rows = {}
    for C in [1, 16, 64, 256, 1024, 4096]:
        ks = jax.random.split(jax.random.key(C), 5)
        q = jax.random.normal(ks[0], (1, C, hq, d), dtype)
        k, v = (jax.random.normal(x, (1, C, hkv, d), dtype) for x in ks[1:3])
        ck, cv = (jax.random.normal(x, (1, L, hkv, d), dtype) for x in ks[3:5])
        cpos = jnp.arange(L, dtype=jnp.int32)[None]
        qpos = L + jnp.arange(C, dtype=jnp.int32)[None]
        row = {"launch_config": launch_config(C, hq // hkv)}
        outs = {}
        for backend in ("xla", "pallas_gpu") if gpu else ("xla",):
            f = jax.jit(lambda *a, b=backend: attend_to_cache(*a, window=window, backend=b))
            args_ = (q, k, v, ck, cv, cpos, qpos)
            bench_inf.warm(lambda: f(*args_))
            n = 20 if C < 1024 else 5
            t0 = time.perf_counter()
            for _ in range(n):
                o = f(*args_)
            o.block_until_ready()
            row[f"{backend}_ms"] = (time.perf_counter() - t0) / n * 1e3
            outs[backend] = np.asarray(o, np.float32)
        if len(outs) == 2:
            row["max_abs_diff"] = float(np.abs(outs["xla"] - outs["pallas_gpu"]).max())
        row["auto"] = choose_cache_backend(C)
        rows[C] = row
        print(f"swa_cache C={C}: " + ", ".join(f"{k_} {v_:.3f}" if isinstance(v_, float) else f"{k_} {v_}"
                                              for k_, v_ in row.items()), flush=True)
    res = {"section": "swa_cache", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "min_chunk": PALLAS_CACHE_MIN_CHUNK, "rows": rows}
    with open(os.path.join(out_dir, "profile_swa_cache.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="decode,prefill,stream,train")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--frames-per-step", default="1,8", help="stream sections: frames per program")
    ap.add_argument("--train-tokens", type=int, default=8192)
    ap.add_argument("--train-mode", default="stage2")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sections = args.sections.split(",")
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    config = tiny_infinitevl() if args.tiny else infinitevl_4b()
    if {"decode", "prefill", "stream"} & set(sections):
        m = bench_inf.prepared(config, dtype)  # per-block decoder weights; the stacked ones are freed
        if "decode" in sections:
            step, holder = bench_inf.decode_loop(m, bench_inf.filled_cache(config, 4096, dtype))
            profiled("decode", step, 10, args.out)
            del holder, step
        if "prefill" in sections:
            C = min(args.chunk, 64) if args.tiny else args.chunk
            holder = {"cache": engine.new_cache(m, 1)}
            embeds = jnp.zeros((1, C, config.text.hidden_size), dtype)
            pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None, None], (3, 1, C))
            seg = jnp.ones((1, C), jnp.int32)

            def prefill():
                lg, holder["cache"] = engine.prefill_step(m.graphdef, m.state, holder["cache"], embeds, pos, seg)
                return lg

            profiled("prefill", prefill, 3, args.out)
            del holder
        if "stream" in sections:
            px = 56 if args.tiny else 448
            for k in [int(x) for x in args.frames_per_step.split(",")]:
                step, _, holder = bench_inf.stream_loop(m, config, dtype, px, k)
                profiled("stream" if k == 1 else f"stream_k{k}", step, max(2, 8 // k), args.out, per=k)
                del holder, step
        del m
    if "swa_cache" in sections:
        swa_cache_section(args, args.out)
    if "train" in sections:
        T = 128 if args.tiny else args.train_tokens
        cfg = bench_train.train_config("infinitevl", args.train_mode, T, args.tiny)
        from infinitevl_jax.training import params as P, trainer
        mc = trainer.student_config(cfg)
        tree, abstract = trainer.build(mc, cfg, 0, abstract=True)
        flat = bench_train.random_params(abstract)
        trainable, frozen = P.partition(flat, cfg.trainable)
        tx = trainer.optimizer(cfg, trainable)
        holder = {"p": trainable, "o": jax.jit(tx.init)(trainable)}
        fns = trainer.StepFns(cfg, tree, None, tx)
        batch = bench_train.text_batch(T, mc.text.vocab_size)

        def step():
            holder["p"], holder["o"], out = fns.train_step(holder["p"], holder["o"], frozen, None, batch)
            return out["loss"]

        profiled(f"train_{args.train_mode}_{T}", step, 2, args.out)


if __name__ == "__main__":
    main()
