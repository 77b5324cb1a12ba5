"""Data pipeline throughput: records/s for single-image records of a given size (448x448 by default).

Measures (1) the per-record transform alone (decode, resize, normalise, patchify, render, tokenise, positions) in
this process and (2) the whole grain pipeline (transform + packing into [batch, seq_len] batches) with 0..N worker
processes, excluding the first batch (worker start-up). Images are JPEG photos-like procedural pictures.

    python benchmarks/data_throughput.py --records 256 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.data import DataConfig, RecordTransform, SourceConfig, make_data_iterator
from infinitevl_jax.data.sources import JsonSource
from infinitevl_jax.processing import Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir


def write_records(root: str, n: int, size: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(n):
            base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            image = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
            draw = ImageDraw.Draw(image)
            for _ in range(5):
                x, y = rng.integers(0, size - 60, 2)
                draw.ellipse((x, y, x + 60, y + 60), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            image = image.filter(ImageFilter.SMOOTH)
            rel = f"images/{i:05d}.jpg"
            image.save(os.path.join(root, rel), quality=90)
            rec = {"messages": [{"role": "user", "content": "<image>Describe the picture in one sentence."},
                                {"role": "assistant", "content": "Five coloured circles on a blurred background."}],
                   "images": [rel]}
            f.write(json.dumps(rec) + "\n")
    return os.path.join(root, "train.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--processor", default=None, help="a processor directory (default: the tiny one, real sizes)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="data_throughput_")
    proc_dir = args.processor or write_tiny_processor_dir(os.path.join(tmp, "proc"), tiny_infinitevl(),
                                                          max_pixels=28 * 28 * 1280)
    processor = Processor.from_pretrained(proc_dir)
    path = write_records(os.path.join(tmp, "data"), args.records, args.image_size)
    print(f"{args.records} records of {args.image_size}x{args.image_size} JPEG, cpu cores: {os.cpu_count()}")

    cfg = DataConfig(sources=(SourceConfig(path),), batch_size=args.batch_size, seq_len=args.seq_len)
    transform = RecordTransform(processor, cfg.record_limits(cfg.packing_spec()))
    source = JsonSource(path)
    transform(source[0])
    t = time.perf_counter()
    n = min(len(source), 128)
    tokens = sum(len(transform(source[i])["input_ids"]) for i in range(n))
    dt = time.perf_counter() - t
    print(f"transform only, 1 process: {n / dt:7.1f} records/s ({tokens / n:.0f} tokens/record)")

    for workers in args.workers:
        cfg = DataConfig(sources=(SourceConfig(path),), batch_size=args.batch_size, seq_len=args.seq_len,
                         worker_count=workers, read_threads=1, num_epochs=None)
        it = make_data_iterator(cfg, processor)
        next(it)
        docs, batches = 0, 0
        t = time.perf_counter()
        while docs < args.records:
            b = next(it)
            docs += int(b["segment_ids"].max(axis=1).sum())
            batches += 1
        dt = time.perf_counter() - t
        it.close()
        print(f"pipeline, {workers} workers: {docs / dt:7.1f} records/s, {batches / dt:5.2f} batches/s "
              f"[{args.batch_size}x{args.seq_len}], pixel_values {tuple(b['pixel_values'].shape)}")


if __name__ == "__main__":
    main()
