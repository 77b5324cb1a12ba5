"""One stage-II training step of InfiniteVL on a device mesh: loss, tokens/s and per-device memory.

    python benchmarks/sharded_step.py --preset infinitevl_4b --mesh 1,-1,1 --batch 2 --seq 8192

The trainer's own step (``trainer.prepare`` on ``trainer.train_mesh``, as ``train.py`` builds it): random weights from
the model's initialisation, created shard by shard under ``jax.jit``; float32 master weights, bf16 compute
(``--dtype``), AdamW, chunked cross-entropy; trainable: the token mixers as in the release's stage-II config
(``--mode stage2``: Gated DeltaNet + SWA q/k/v/o) or every language-model parameter (``--mode full``). The batch is
random text packed with two documents per row, each process feeding its rows. Prints one JSON line. Run it with
``CUDA_VISIBLE_DEVICES=0`` and with both GPUs at the same ``--batch`` to compare 1 vs 2 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_step import FULL_FT, STAGE2  # noqa: E402
from infinitevl_jax import distributed, sharding  # noqa: E402
from infinitevl_jax.config import GDN  # noqa: E402
from infinitevl_jax.positions import compute_positions  # noqa: E402
from infinitevl_jax.training import config as tc, params as P, trainer  # noqa: E402
from infinitevl_jax.training.losses import IGNORE, naive_cross_entropy  # noqa: E402


# The batch, and a model-level loss/gradient that ``tests/sharding_checks.py`` compares across meshes.
def random_batch(config, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Text tokens, two packed documents per row; ``labels`` are the next tokens (IGNORE: no target)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.text.vocab_size - 16, size=(batch, seq)).astype(np.int32)
    seg = np.where(np.arange(seq)[None] < seq // 2 + np.arange(batch)[:, None], 1, 2).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), IGNORE, np.int32)], axis=1)
    labels = np.where(np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((batch, 1), bool)], axis=1), labels, IGNORE)
    empty = np.zeros((0, 3), np.int64)
    pos = compute_positions(config, ids, seg, empty, empty, None).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "position_ids": pos, "labels": labels}


def lm_loss(model, batch) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy (float32) over labels != IGNORE; returns ``(loss, logits)``."""
    logits = model.forward(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
    total, count = naive_cross_entropy(logits, batch["labels"])
    return total / jnp.maximum(count, 1).astype(jnp.float32), logits


def loss_and_grads(model, batch):
    """``(loss, logits, grads)`` of ``lm_loss`` with respect to every ``nnx.Param``."""
    (loss, logits), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, batch)
    return loss, logits, grads


def train_config(args) -> tc.TrainConfig:
    """The stage-II ``TrainConfig`` of the benchmark (``--layers`` shortens the preset's stack, default pattern)."""
    text = {"num_hidden_layers": args.layers, "layer_types": ()} if args.layers else {}
    preset = trainer.resolve_model_config(args.preset, text)
    stage2 = STAGE2["infinitevl" if GDN in preset.text.layer_types else "teacher"]
    return tc.TrainConfig(
        stage="sft", mesh=args.mesh,
        model=tc.ModelConfig(preset=args.preset, text_overrides=text, compute_dtype=args.dtype, param_dtype="float32",
                             remat=args.remat),
        data=tc.DataSection(kind="demo", batch_size=args.batch, seq_len=args.seq),
        optim=tc.OptimConfig(lr=1e-5, steps=1000, warmup_frac=0.01),
        trainable=stage2 if args.mode == "stage2" else FULL_FT,
        loss=tc.LossConfig(chunk_size=min(2048, args.seq)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="infinitevl_4b")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (or dcn,data,fsdp,tensor); -1 = fill")
    ap.add_argument("--batch", type=int, default=2, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (master weights are float32)")
    ap.add_argument("--mode", default="stage2", choices=("stage2", "full"),
                    help="trainable: the token mixers (stage II) or every language-model parameter")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    args = ap.parse_args(argv)

    distributed.initialize()
    cfg = train_config(args)
    mesh = trainer.train_mesh(cfg)
    t0 = time.perf_counter()
    s = trainer.prepare(cfg, mesh)
    trainable, opt_state, frozen = s.trainable, s.opt_state, s.frozen
    jax.block_until_ready((trainable, opt_state, frozen))
    t_init = time.perf_counter() - t0
    param_bytes = max(sharding.bytes_per_device({**frozen, **trainable}).values())
    state_bytes = max(sharding.bytes_per_device(opt_state).values())

    host = random_batch(s.mc, args.batch, args.seq)
    host["labels"] = np.where(host["segment_ids"] > 0, host["input_ids"], IGNORE)  # the step shifts them itself
    batches = trainer.feed(s.mc, [host], mesh, args.batch)

    t0 = time.perf_counter()
    trainable, opt_state, out = s.fns.train_step(trainable, opt_state, frozen, None, batches)
    loss0 = float(out["loss"])
    t_first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainable, opt_state, out = s.fns.train_step(trainable, opt_state, frozen, None, batches)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)

    mem = [d.memory_stats() or {} for d in mesh.devices.flat if d.process_index == jax.process_index()]
    step_s = float(np.median(times)) if times else float("nan")
    result = {
        "preset": args.preset, "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)), "devices": mesh.size,
        "platform": jax.devices()[0].platform, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "mode": args.mode, "remat": args.remat, "trainable": P.count_tree(trainable), "loss_step0": loss0,
        "init_s": round(t_init, 2), "first_step_s": round(t_first, 2),
        "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "tokens_per_s_per_device": round(args.batch * args.seq / step_s / mesh.size, 1),
        "peak_gib_per_device": [round(m.get("peak_bytes_in_use", 0) / 2**30, 2) for m in mem],
        "param_gib_per_device": round(param_bytes / 2**30, 3),
        "opt_state_gib_per_device": round(state_bytes / 2**30, 3),
    }
    if distributed.is_main_process():
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
