"""Plots of an inference benchmark run: decode ms/token vs context (InfiniteVL, teacher mode, and the PyTorch
baseline's points when given) and streaming frames/s per frames-per-program.

    python benchmarks/plot_inference.py RESULTS.json [--torch TORCH.json] --out decode.png
"""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="inference.json written by benchmarks/inference.py")
    ap.add_argument("--torch", help="inference_torch.json written by benchmarks/inference_torch.py")
    ap.add_argument("--out", default="inference.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.load(open(args.results))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("decode", "InfiniteVL"), ("teacher_decode", "Qwen2.5-VL-3B teacher mode (same code)")):
        pts = sorted((int(c), v["ms"]) for c, v in r.get(key, {}).items())
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if args.torch:
        t = json.load(open(args.torch))
        pts = sorted((int(c), v["decode_ms_per_token"]) for c, v in t["contexts"].items())
        ax.plot(*zip(*pts), marker="s", linestyle="--", label="transformers generate (sdpa)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("batch-1 decode ms/token")
    ax.set_title(f"decode, {r.get('device', '')}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    stream = sorted((int(k), v["fps"]) for k, v in r.get("stream", {}).items())
    if stream:
        bx.bar([str(k) for k, _ in stream], [f for _, f in stream])
        bx.axhline(100, color="r", linestyle=":", label="target 100 FPS")
        bx.set_xlabel("frames per program")
        bx.set_ylabel("frames/s (448x448, 256 tokens each)")
        bx.set_title("streaming")
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
