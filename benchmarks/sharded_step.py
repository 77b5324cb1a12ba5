"""One LM-loss training step of InfiniteVL on a device mesh: loss, tokens/s and per-device memory.

    python benchmarks/sharded_step.py --preset infinitevl_4b --mesh 1,-1,1 --batch 2 --seq 8192 --dtype bfloat16

Random weights (``sharding.create_model``: initialised shard by shard), a random text batch packed with two documents
per row, cross-entropy over every next token, then SGD on every parameter. Prints one JSON line. Run it with
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

from infinitevl_jax import config as config_lib  # noqa: E402
from infinitevl_jax import distributed, sharding  # noqa: E402
from infinitevl_jax.positions import compute_positions  # noqa: E402
from infinitevl_jax.training.losses import IGNORE, naive_cross_entropy  # noqa: E402


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


def sgd_step(model, batch, lr: float = 1e-3) -> jax.Array:
    """One plain SGD step in place; returns the loss."""
    (loss, _), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, batch)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: (p - lr * g.astype(jnp.float32)).astype(p.dtype), params, grads))
    return loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="infinitevl_4b")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (or dcn,data,fsdp,tensor); -1 = fill")
    ap.add_argument("--batch", type=int, default=2, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) one")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    args = ap.parse_args(argv)

    distributed.initialize()
    config = config_lib.preset(args.preset)
    if args.layers:
        config = config.replace(text=config.text.__class__(
            **{**config.text.__dict__, "num_hidden_layers": args.layers, "layer_types": ()}))
    dtype = jnp.dtype(args.dtype)
    mesh = sharding.make_mesh(args.mesh)
    t0 = time.perf_counter()
    model = sharding.create_model(config, mesh, dtype=dtype, param_dtype=dtype, remat_policy=args.remat)
    jax.block_until_ready(nnx.state(model))
    t_init = time.perf_counter() - t0

    host = random_batch(config, args.batch, args.seq)
    start, stop = distributed.process_batch_rows(args.batch, mesh)
    local = {k: (v[:, start:stop] if k == "position_ids" else v[start:stop]) for k, v in host.items()}
    batch = distributed.global_batch(local, mesh, args.batch)

    param_bytes = max(sharding.bytes_per_device(nnx.state(model, nnx.Param)).values())
    graphdef, state = nnx.split(model)

    def step(state, batch):
        m = nnx.merge(graphdef, state)
        loss = sgd_step(m, batch)
        return nnx.state(m), loss

    step = jax.jit(step, donate_argnums=0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, loss0 = step(state, batch)
        loss0 = float(loss0)
        t_first = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, loss = step(state, batch)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - t0)

    mem = [d.memory_stats() or {} for d in mesh.devices.flat if d.process_index == jax.process_index()]
    step_s = float(np.median(times)) if times else float("nan")
    result = {
        "preset": args.preset, "mesh": dict(zip(mesh.axis_names, mesh.axis_sizes)), "devices": mesh.size,
        "platform": jax.devices()[0].platform, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "remat": args.remat, "loss_step0": loss0, "init_s": round(t_init, 2), "first_step_s": round(t_first, 2),
        "step_s": round(step_s, 4), "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "tokens_per_s_per_device": round(args.batch * args.seq / step_s / mesh.size, 1),
        "peak_gib_per_device": [round(m.get("peak_bytes_in_use", 0) / 2**30, 2) for m in mem],
        "param_gib_per_device": round(param_bytes / 2**30, 3),
    }
    if distributed.is_main_process():
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
