"""Batch-1 decode step of the full-size model (random bf16 weights, a cache filled to ``--context``) compiled with the
XLA options given as JSON (``engine.DECODE_COMPILER_OPTIONS`` for the default backend): first-call seconds and
ms/token over ``--reps`` x ``--steps`` tokens. XLA's autotuning results are shared within a process, so compare
settings in separate processes, with a baseline (``'{}'``) in the same device call:

    for o in '{}' '{"xla_gpu_exhaustive_tiling_search": true}'; do
        PYTHONPATH=. python3 benchmarks/decode_options.py "$o"; done
    PYTHONPATH=. python3 benchmarks/decode_options.py '{}' --tiny --context 64 --steps 3   # CPU smoke run

Appends one JSON line per run to ``$OUT/decode_options.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference as bench_inf  # noqa: E402  (benchmarks/inference.py)

from infinitevl_jax.config import infinitevl_4b, tiny_infinitevl  # noqa: E402
from infinitevl_jax.inference import engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("options", help="JSON object of XLA options, e.g. '{\"xla_gpu_exhaustive_tiling_search\": true}'")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    opts = json.loads(args.options)
    engine.DECODE_COMPILER_OPTIONS[jax.default_backend()] = opts
    cfg = tiny_infinitevl() if args.tiny else infinitevl_4b()
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = bench_inf.prepared(cfg, dtype)
    step, holder = bench_inf.decode_loop(model, bench_inf.filled_cache(cfg, args.context, dtype))
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "options": opts,
           "context": args.context, "first_call_s": time.perf_counter() - t0, "ms_per_token": []}
    for _ in range(args.reps):
        ms, holder["cache"] = bench_inf.time_decode(model, holder["cache"], args.steps)
        res["ms_per_token"].append(ms)
    print(json.dumps(res), flush=True)
    out = os.environ.get("OUT") or "/tmp"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode_options.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
