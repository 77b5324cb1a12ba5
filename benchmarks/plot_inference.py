"""Plots of an inference benchmark run: decode ms/token vs context (InfiniteVL, teacher mode, and the PyTorch
baseline's points when given), prefill tokens/s vs context, and streaming frames/s vs frame index (one line per
frames-per-program setting; bars of the median when per-step times were not kept).

    python benchmarks/plot_inference.py RESULTS.json [MORE.json ...] [--torch TORCH.json] --out decode.png

Several results files (separate calls of ``benchmarks/inference.py`` with different ``--parts``) are merged, later
files adding to and overriding earlier ones section by section.
"""

from __future__ import annotations

import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="inference.json files written by benchmarks/inference.py")
    ap.add_argument("--torch", help="inference_torch.json written by benchmarks/inference_torch.py")
    ap.add_argument("--out", default="inference.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = {}
    for path in args.results:
        for key, value in json.load(open(path)).items():
            if key.endswith("prefill") and isinstance(value, dict) and "tokens" in value:
                value = {str(value["tokens"]): value}  # older files: one prefill row
            if isinstance(value, dict) and isinstance(r.get(key), dict):
                r[key] = {**r[key], **value}
            else:
                r[key] = value
    fig, (ax, px, bx) = plt.subplots(1, 3, figsize=(16, 4))
    for key, label, color in (("decode", "InfiniteVL", "C0"),
                              ("teacher_decode", "Qwen2.5-VL-3B teacher mode (same code)", "C1")):
        pts = sorted((int(c), v["ms"]) for c, v in r.get(key, {}).items())
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, color=color)
    if args.torch:
        t = json.load(open(args.torch))
        pts = sorted((int(c), v["decode_ms_per_token"]) for c, v in t["contexts"].items())
        ax.plot(*zip(*pts), marker="s", linestyle="--", label="transformers generate (sdpa)", color="C2")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("batch-1 decode ms/token")
    ax.set_title(f"decode, {r.get('device', '')}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for key, label, color in (("prefill", "InfiniteVL", "C0"), ("teacher_prefill", "teacher mode (same code)", "C1")):
        pts = sorted((int(c), v["tokens_per_s"]) for c, v in r.get(key, {}).items() if "tokens_per_s" in v)
        if pts:
            px.plot(*zip(*pts), marker="o", label=label, color=color)
    if args.torch:
        pts = sorted((int(c), v["prefill_tokens_per_s"]) for c, v in t["contexts"].items()
                     if "prefill_tokens_per_s" in v)
        if pts:
            px.plot(*zip(*pts), marker="s", linestyle="--", label="transformers generate, 1 token (sdpa)", color="C2")
    px.set_xscale("log", base=2)
    px.set_xlabel("prompt length (tokens)")
    px.set_ylabel("prefill tokens/s")
    px.set_title("prefill, batch 1")
    px.legend(fontsize=8)
    px.grid(alpha=0.3)
    stream = sorted((int(k), v) for k, v in r.get("stream", {}).items())
    if stream and all("step_s" in v for _, v in stream):
        for k, v in stream:
            steps = v["step_s"]
            frames = [(i + 1) * k for i in range(len(steps))]
            bx.plot(frames, [k / s for s in steps], linewidth=0.8, label=f"{k} frame(s) per program")
        bx.set_xlabel("frame index")
        bx.set_ylabel("frames/s (448x448, 256 tokens each)")
        bx.set_ylim(bottom=0)
    elif stream:
        bx.bar([str(k) for k, _ in stream], [v["fps"] for _, v in stream])
        bx.set_xlabel("frames per program")
        bx.set_ylabel("frames/s (448x448, 256 tokens each)")
    if stream:
        bx.axhline(100, color="r", linestyle=":", label="target 100 FPS")
        bx.set_title("streaming")
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
