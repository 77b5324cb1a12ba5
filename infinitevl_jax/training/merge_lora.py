"""``infinitevl merge-lora``: folds a stage III run's LoRA adapters into its frozen base and writes a model checkpoint.

    infinitevl merge-lora --run runs/stage3_long_lora --out checkpoints/infinitevl_stage3 [--config configs/stage3_long_lora.yaml]
    infinitevl convert --to-hf --ckpt checkpoints/infinitevl_stage3 --out hf/infinitevl_stage3

The run directory is a training run's Orbax ``CheckpointManager`` directory (latest step; params + adapters +
rank/alpha). ``W' = W + (alpha / rank) A B`` in float32, cast back to the base's dtype. The output is the converter's
checkpoint layout (``infinitevl_config.json`` + ``params/``), which ``infinitevl convert --to-hf`` exports. The model
config comes from the run's ``model_config.json`` (written by ``train.py``) or, for older runs, from ``--config``.
A run without adapters (stages I and II) is written unchanged, so the command also exports any stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MODEL_CONFIG_FILE = "model_config.json"


def model_config_of_run(run_dir: str, config_path: str | None = None, overrides=()):
    from infinitevl_jax.config import InfiniteVLConfig

    file = os.path.join(run_dir, MODEL_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as f:
            return InfiniteVLConfig.from_dict(json.load(f))
    if not config_path:
        raise ValueError(f"{file} not found: pass --config (the training YAML of the run)")
    from infinitevl_jax.training import config as tc, trainer

    return trainer.student_config(tc.load(config_path, list(overrides)))


def merge_run(run_dir: str, out: str, *, config_path: str | None = None, overrides=(), dtype: str | None = None) -> dict:
    """Writes the merged model of ``run_dir``'s latest checkpoint to ``out``; returns a summary."""
    import jax.numpy as jnp
    from flax import nnx

    from infinitevl_jax import checkpoint
    from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration
    from infinitevl_jax.training import checkpointing, params as P

    mc = model_config_of_run(run_dir, config_path, overrides)
    flat, n_adapters = checkpointing.load_params(run_dir, with_count=True)
    model = nnx.eval_shape(lambda: InfiniteVLForConditionalGeneration(mc, rngs=nnx.Rngs(0)))
    tree, names = P.split_model(model)
    missing = sorted(set(names) - set(flat))
    if missing:
        raise ValueError(f"{run_dir}: the checkpoint lacks {len(missing)} parameters of the model, e.g. {missing[0]}")
    cast = (lambda x: jnp.asarray(x, dtype)) if dtype else jnp.asarray
    model = tree.merge({k: cast(flat[k]) for k in names})
    checkpoint.save(out, model)
    return {"out": out, "parameters": P.count(flat), "merged_adapters": n_adapters}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="training run directory (Orbax CheckpointManager of a stage)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--config", default=None, help="the run's training YAML (only when the run has no model_config.json)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="store the merged parameters in this dtype (default: as trained)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")


def run(args) -> int:
    try:
        s = merge_run(args.run, args.out, config_path=args.config, overrides=args.overrides, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['out']}: {s['parameters']} parameters, {s['merged_adapters']} LoRA adapters merged")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("merge-lora", help="fold LoRA adapters into the base for export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
