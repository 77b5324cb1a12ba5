"""A/B of the batch-1 decode step: single-row products as two-row GEMMs (``layers.SINGLE_ROW_AS_TWO``) on and off,
crossed with the GDN decode update's backend (``auto``: the Pallas kernel on sm80+ GPUs; ``xla``). Full-size random
bf16 weights on the inference path, caches filled to each context; every setting is re-traced (``jax.clear_caches``)
and timed twice, interleaved. Writes ``$OUT/decode_ab.json``.

    PYTHONPATH=. python3 benchmarks/decode_ab.py
    PYTHONPATH=. python3 benchmarks/decode_ab.py --tiny --contexts 64 --steps 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference as bench_inf  # noqa: E402  (benchmarks/inference.py)

from infinitevl_jax import ops  # noqa: E402
from infinitevl_jax.config import infinitevl_4b, tiny_infinitevl  # noqa: E402
from infinitevl_jax.modeling import layers  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    cfg = tiny_infinitevl() if args.tiny else infinitevl_4b()
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    m = bench_inf.prepared(cfg, dtype)
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ms_per_token": {}}
    saved = layers.SINGLE_ROW_AS_TWO
    try:
        for rep in range(args.reps):
            for two_rows, gdn in ((True, "auto"), (False, "auto"), (True, "xla"), (False, "xla")):  # True: also on CPU
                layers.SINGLE_ROW_AS_TWO = two_rows
                jax.clear_caches()
                with ops.use_backends(gdn=gdn):
                    for C in [int(c) for c in args.contexts.split(",")]:
                        ms, cache = bench_inf.time_decode(m, bench_inf.filled_cache(cfg, C, dtype), args.steps)
                        del cache
                        res["ms_per_token"][f"two_rows={two_rows} gdn={gdn} ctx={C} rep{rep}"] = ms
                        print(f"two-row products {two_rows!s:5}  gdn {gdn:4}  ctx {C:7d}: {ms:.3f} ms/token", flush=True)
    finally:
        layers.SINGLE_ROW_AS_TWO = saved
    out = os.environ.get("OUT") or "/tmp"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode_ab.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
