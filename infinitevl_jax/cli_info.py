"""``infinitevl info``: a config's layer pattern and parameter count, without allocating the weights."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a config's layer pattern and parameter count")
    p.add_argument("config", help="a preset name (infinitevl_4b, qwen2_5_vl_3b, ...) or a Hugging Face directory/config.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    from flax import nnx

    from infinitevl_jax import config as C
    from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration

    cfg = C.PRESETS[args.config]() if args.config in C.PRESETS else C.InfiniteVLConfig.from_hf(args.config)
    model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    count = lambda tree: sum(x.size for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))
    stack = model.language_model.layers
    kinds = cfg.text.layer_types
    print(f"model_type      {cfg.model_type}")
    print(f"layer pattern   {' + '.join(kinds[: stack.period])}  x {stack.num_blocks}")
    print(f"layer counts    " + ", ".join(f"{k}: {kinds.count(k)}" for k in sorted(set(kinds))))
    print(f"parameters      {count(model):,} (language {count(model.language_model):,}, vision {count(model.visual):,})")
    return 0
