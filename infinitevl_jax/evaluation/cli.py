"""``infinitevl eval``: benchmarks of a converted or trained checkpoint, from local files, resumable."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on VLM benchmarks from local files",
                              description=__doc__)
    p.add_argument("--ckpt", required=True, help="our checkpoint directory (infinitevl_jax.checkpoint.save/convert)")
    p.add_argument("--benchmark", action="append", required=True,
                   help="benchmark name (MMBench, MMStar, SEEDBench, ScienceQA, RealWorldQA, AI2D, MMMU, MathVista, "
                        "OCRBench, TextVQA, DocVQA, ChartQA or a VLMEvalKit dataset name); repeat with --data")
    p.add_argument("--data", action="append", required=True, help="its local TSV or VQA JSON file")
    p.add_argument("--image-root", default=None, help="where VQA-JSON images live (default: next to the JSON)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    p.add_argument("--out", default=None, help="results JSON (default: eval_results/<ckpt name>/results.json); "
                                               "predictions and the markdown table are written next to it")
    p.add_argument("--processor", default=None, help="tokenizer/processor directory (default: --ckpt)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per benchmark (128, MMMU/MathVista 1024)")
    p.add_argument("--min-pixels", type=int, default=None, help="default 128*28*28 (OCRBench 10*10*28*28)")
    p.add_argument("--max-pixels", type=int, default=None, help="default 2304*28*28")
    p.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16 (default: the stored one)")
    p.add_argument("--mesh", default=None,
                   help="experimental: shard the parameters over a (data,fsdp,tensor) mesh, e.g. 1,-1,1 "
                        "(default: one device)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if len(args.benchmark) != len(args.data):
        raise SystemExit(f"--benchmark given {len(args.benchmark)} times but --data {len(args.data)} times")
    from infinitevl_jax import checkpoint
    from infinitevl_jax.evaluation.runner import EvalSpec, evaluate_model, results_markdown
    from infinitevl_jax.processing import Processor

    mesh = shardings = None
    if args.mesh:
        from flax import nnx

        from infinitevl_jax import sharding

        mesh = sharding.make_mesh(args.mesh)

        def shardings(abstract, mesh):  # flat {nnx path: sharding}, the form checkpoint.load reads as is
            return dict(nnx.to_flat_state(sharding.param_shardings(abstract, mesh)))
    model = checkpoint.load(args.ckpt, mesh=mesh, dtype=args.dtype, shardings=shardings)
    processor = Processor.from_pretrained(args.processor or args.ckpt)
    out = args.out or os.path.join("eval_results", os.path.basename(os.path.normpath(args.ckpt)), "results.json")
    specs = [EvalSpec(b, d, args.image_root) for b, d in zip(args.benchmark, args.data)]
    results = evaluate_model(model, processor, specs, out, checkpoint=os.path.abspath(args.ckpt),
                             batch_size=args.batch_size, limit=args.limit, max_new_tokens=args.max_new_tokens,
                             min_pixels=args.min_pixels, max_pixels=args.max_pixels, progress=not args.no_progress)
    print(results_markdown({"checkpoint": args.ckpt, "benchmarks": results}), end="")
    print(f"results: {out}")
    return 0
