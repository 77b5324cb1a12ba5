"""Where the time goes: device-kernel profiles of the decode step, a prefill chunk, a streamed frame and a stage-II
training step of the full-size model (random weights, bf16), summarised on the machine that ran them.

Each section runs its jitted step once to compile, then a few times under ``jax.profiler`` with a Perfetto trace; the
trace's device events are grouped by (device line, kernel/op name) and the largest are written to
``$OUT/profile_<section>.json`` together with the wall time per step. Summaries, not traces, come back: a trace of a
training step is tens of MB.

    python benchmarks/profile_steps.py --sections decode,prefill,stream,train
    python benchmarks/profile_steps.py --tiny --sections decode,prefill,stream,train   # CPU smoke run
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
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference as bench_inf  # noqa: E402  (benchmarks/inference.py)
import train_step as bench_train  # noqa: E402  (benchmarks/train_step.py)

from infinitevl_jax.config import infinitevl_4b, tiny_infinitevl  # noqa: E402
from infinitevl_jax.inference import engine, init_cache  # noqa: E402
from infinitevl_jax.inference.streaming import frame_position_ids  # noqa: E402
from infinitevl_jax.modeling.vision import vision_layout  # noqa: E402


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


def profiled(name: str, fn, reps: int, out_dir: str) -> dict:
    """Runs ``fn()`` (returns something to block on) to warm up, then ``reps`` times timed and ``reps`` times under the
    profiler. Two warm-up calls: a step fed its own outputs may compile once more than a step fed fresh inputs."""
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
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
    res = {"section": name, "reps": reps, "wall_ms_per_rep": wall * 1e3, "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, **summary}
    with open(os.path.join(out_dir, f"profile_{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"{name}: {wall * 1e3:.2f} ms per rep", flush=True)
    for line, us in list(res.get("lines_us", {}).items())[:6]:
        print(f"  {us / reps / 1e3:9.3f} ms/rep  {line}", flush=True)
        for row in res["top"][line][:12]:
            print(f"      {row['us'] / reps / 1e3:8.3f} ms  x{row['n'] // reps:<4} {row['name'][:110]}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sections", default="decode,prefill,stream,train")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--train-tokens", type=int, default=8192)
    ap.add_argument("--train-mode", default="stage2")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    sections = args.sections.split(",")
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    config = tiny_infinitevl() if args.tiny else infinitevl_4b()
    if {"decode", "prefill", "stream"} & set(sections):
        model = bench_inf.build(config, dtype)
        graphdef, state = nnx.split(model)
        del model
        if "decode" in sections:
            holder = {"cache": bench_inf.filled_cache(config, 4096, dtype), "tok": jnp.zeros((1,), jnp.int32)}
            key = jax.random.key(0)

            def decode():
                holder["tok"], _, holder["cache"] = engine.decode_step(graphdef, state, holder["cache"], holder["tok"],
                                                                       key, 0.0, 1.0, top_k=0, greedy=True)
                return holder["tok"]

            profiled("decode", decode, 10, args.out)
            del holder
        if "prefill" in sections:
            C = min(args.chunk, 64) if args.tiny else args.chunk
            holder = {"cache": init_cache(config, 1, dtype=dtype)}
            embeds = jnp.zeros((1, C, config.text.hidden_size), dtype)
            pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None, None], (3, 1, C))
            seg = jnp.ones((1, C), jnp.int32)

            def prefill():
                lg, holder["cache"] = engine.prefill_step(graphdef, state, holder["cache"], embeds, pos, seg)
                return lg

            profiled("prefill", prefill, 3, args.out)
            del holder
        if "stream" in sections:
            vc = config.vision
            g = (56 if args.tiny else 448) // vc.patch_size
            grid = (1, g, g)
            pix = jnp.asarray(np.random.RandomState(0).randn(g * g, vc.patch_dim), dtype)
            layout = vision_layout(np.asarray([grid]), vc)
            ntok = g * g // vc.merge_unit
            ids = jnp.full((1, ntok), config.image_token_id, jnp.int32)
            seg = jnp.ones((1, ntok), jnp.int32)
            holder = {"cache": init_cache(config, 1, dtype=dtype), "i": 0}

            def frame():
                pos = jnp.asarray(frame_position_ids(grid, 10, holder["i"], vc.spatial_merge_size)[:, None])
                holder["i"] += 1
                lg, holder["cache"] = engine.embed_prefill_step(graphdef, state, holder["cache"], ids,
                                                                {"pixel_values": pix, "image_layout": layout}, pos, seg)
                return lg

            profiled("stream", frame, 5, args.out)
            del holder
        del graphdef, state
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
