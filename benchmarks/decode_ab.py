"""A/B of the batch-1 decode step over three switches: projections reading the same input fused into one product
(``engine.prepare(fuse=...)``), single-row products as two-row GEMMs (``layers.SINGLE_ROW_AS_TWO``), and the GDN
decode update's backend (``auto``: the Pallas kernels on sm80+ GPUs; ``xla``); optional fourth, fifth and sixth
fields ``0`` turn off one kernel alone: the GDN decode-mixer kernels, the sliding-window decode kernel, the residual
add + RMSNorm kernel (their XLA paths instead, the rest as chosen). Full-size random bf16 weights on the
inference path (the fused model shares every unfused array it does not replace), caches filled to each context;
every setting is re-traced (``jax.clear_caches``) and timed ``--reps`` times, interleaved. Writes
``$OUT/decode_ab.json``.

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

from flax import nnx  # noqa: E402

from infinitevl_jax import ops  # noqa: E402
from infinitevl_jax.inference import engine  # noqa: E402
from infinitevl_jax.modeling.decoder import fuse_projections  # noqa: E402
from pallas_kernels.gated_delta_rule import decode_mixer as dm  # noqa: E402
from pallas_kernels.sliding_window_attention import attention as swa_attention  # noqa: E402
from infinitevl_jax.config import infinitevl_4b, tiny_infinitevl  # noqa: E402
from infinitevl_jax.modeling import layers  # noqa: E402


def fused_copy(m: engine.InferenceModel) -> engine.InferenceModel:
    """``m`` with its projections fused (new arrays for the fused ones; every other array shared with ``m``)."""
    model = m.graphdef.merge(m.state)
    fuse_projections(model.language_model.layers.blocks)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return engine.InferenceModel(engine.PreparedDef(graphdef, treedef), tuple(leaves), m.config, m.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variants", default="1:1:auto,1:1:auto:1:1:0,1:1:auto:1:0,1:1:auto:0:0,0:1:auto:0:0",
                    help="comma-separated fuse:two_rows:gdn[:mixer_kernels[:swa_kernel[:norm_kernel]]] settings (0 or "
                         "1; gdn auto or xla)")
    args = ap.parse_args()
    cfg = tiny_infinitevl() if args.tiny else infinitevl_4b()
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    unfused = engine.prepare(bench_inf.build(cfg, dtype), consume=True, fuse=False)
    models = {False: unfused, True: fused_copy(unfused)}
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ms_per_token": {}}
    saved, resolve, choose = layers.SINGLE_ROW_AS_TWO, dm.resolve_backend, swa_attention.choose_cache_backend
    try:
        for rep in range(args.reps):
            for fuse, two_rows, gdn, *kernels in variants:
                fuse, two_rows = fuse == "1", two_rows == "1"
                mixer_kernels, swa_kernel, norm_kernel = ((kernels + ["1"] * 3)[i] == "1" for i in range(3))
                dm.resolve_backend = resolve if mixer_kernels else (lambda *a: "xla")
                swa_attention.choose_cache_backend = (choose if swa_kernel else
                                                      lambda c: "xla" if c == 1 else choose(c))
                layers.SINGLE_ROW_AS_TWO = two_rows  # True: also on CPU
                jax.clear_caches()
                with ops.use_backends(gdn=gdn, norm="auto" if norm_kernel else "xla"):
                    for C in [int(c) for c in args.contexts.split(",")]:
                        cache = bench_inf.filled_cache(cfg, C, dtype)
                        ms, cache = bench_inf.time_decode(models[fuse], cache, args.steps)
                        del cache
                        key = (f"fuse={fuse} two_rows={two_rows} gdn={gdn} mixer_kernels={mixer_kernels} "
                               f"swa_kernel={swa_kernel} norm_kernel={norm_kernel} ctx={C} rep{rep}")
                        res["ms_per_token"][key] = ms
                        print(f"fused {fuse!s:5}  two-row products {two_rows!s:5}  gdn {gdn:4}  mixer kernels "
                              f"{mixer_kernels!s:5}  swa kernel {swa_kernel!s:5}  norm kernel {norm_kernel!s:5}  "
                              f"ctx {C:7d}: {ms:.3f} ms/token", flush=True)
    finally:
        layers.SINGLE_ROW_AS_TWO = saved
        dm.resolve_backend, swa_attention.choose_cache_backend = resolve, choose
    out = os.environ.get("OUT") or "/tmp"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "decode_ab.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
