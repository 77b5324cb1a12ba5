"""Full-size conversion benchmark: a random bf16 InfiniteVL checkpoint (4,408,381,536 parameters, the release's names
and shapes, two safetensors shards) converted to our Orbax checkpoint on CPU.

Reports wall time and the converter's peak anonymous memory (``RssAnon`` of the converting process, sampled every
50 ms from outside), which must stay below the checkpoint's size. Files go under ``--workdir`` and are deleted.

    nice -n 10 python benchmarks/convert_full_size.py [--workdir /tmp/convert_bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from infinitevl_jax import checkpoint as ckpt
from infinitevl_jax import config as C
from infinitevl_jax import convert, hf_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_checkpoint(directory: str, config: C.InfiniteVLConfig) -> int:
    os.makedirs(directory)
    rng = np.random.default_rng(0)
    entries = hf_names.entries(config)
    total = sum(int(np.prod(e.hf_shape)) for e in entries)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def produce(shape):
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    specs = [(hf_names.hf_name(e.hf, "current"), e.hf_shape, bf16, produce(e.hf_shape)) for e in entries]
    ckpt.write_safetensors_shards(directory, specs, max_shard_bytes=total)  # two shards, as on the hub
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(convert.hf_config_dict(config), f, indent=2)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    config = C.infinitevl_4b()
    hf_dir, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "orbax")
    shutil.rmtree(args.workdir, ignore_errors=True)
    try:
        t = time.time()
        n = write_random_checkpoint(hf_dir, config)
        size = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        print(f"wrote random checkpoint: {n:,} parameters, {size / 2**30:.2f} GiB, {time.time() - t:.0f} s",
              flush=True)
        t = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), "--hf-dir", hf_dir,
                                 "--out", out, "--dtype", "bfloat16", "--quiet"], stdout=subprocess.PIPE, text=True)
        sampler = convert.RssSampler(proc.pid, interval=0.05)
        while proc.poll() is None:
            sampler.sample()
            time.sleep(0.05)
        wall = time.time() - t
        summary = proc.stdout.read().strip()
        if proc.returncode:
            raise SystemExit(f"conversion failed ({proc.returncode}): {summary}")
        out_size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
        result = {
            "parameters": n, "checkpoint_gib": round(size / 2**30, 2), "orbax_gib": round(out_size / 2**30, 2),
            "convert_wall_s": round(wall, 1), "peak_rss_anon_gib": round(sampler.peak / 2**30, 2),
            "below_checkpoint_size": sampler.peak < size, "converter_summary": summary,
        }
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
