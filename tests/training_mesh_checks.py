"""Trainer runs on 8 fake CPU devices; run by ``tests/test_training_mesh.py`` in a subprocess.

    python tests/training_mesh_checks.py --work DIR --out results.json

Sets the device count itself (before JAX starts), so the rest of the test suite keeps its one CPU device. Runs:
stage II on ``1,8,1`` stopped by SIGTERM after ``K`` steps (a checkpoint), then resumed on ``2,2,2`` up to ``N``;
LoRA steps on ``1,8,1`` from that checkpoint (``init.params``); the parameters ``trainer.build`` creates directly
sharded on ``1,8,1``. Writes losses and
layouts as JSON and parameters as ``.npz``; the assertions live in ``test_training_mesh.py``.
"""

from __future__ import annotations

import os
import sys

N, K = 4, 2  # steps of the stage-II run; the first run stops after K
LORA_STEPS = 3  # the first step has learning rate 0 (warm-up), so 3 losses see 2 updates
# Adapters on the query and down projections only: both layouts (``a`` split like its kernel's input, ``b`` like its
# output) at a fraction of the compile time of every target.
LORA = ("init.params={}", "lora.targets=['.*/self_attn/q_proj/kernel', '.*/mlp/down_proj/kernel']")
SMOKE = "configs/demo_smoke.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cfg(workdir: str | None, stage: str, steps: int, mesh: str = "", cache: str | None = None, *extra: str):
    """The tiny float32 run every check uses (the single-device references too)."""
    from infinitevl_jax.training import config as tc

    extra = list(extra) + ([f"mesh={mesh}"] if mesh else [])
    extra += [f"checkpoint.dir={workdir}"] if workdir else []
    extra += [f"compilation_cache={cache}"] if cache else []
    return tc.load(os.path.join(ROOT, SMOKE), [
        f"stage={stage}", f"optim.steps={steps}", "optim.lr=1e-2", "optim.warmup_frac=0.0", "log.every=1",
        "model.text_overrides.num_hidden_layers=2", "model.compute_dtype=float32", "checkpoint.every=1000",
        "checkpoint.use_async=true", *extra])


def _specs(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): [None if s is None else s if isinstance(s, str) else list(s)
                                         for s in leaf.sharding.spec]
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_flat(path: str, tree) -> None:
    """A flat (or LoRA ``{name: {a, b}}``) parameter dict as ``.npz``."""
    import numpy as np

    flat = {f"{k}/{ab}": v for k, d in tree.items() for ab, v in d.items()} if isinstance(
        next(iter(tree.values())), dict) else tree
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def run(work: str) -> dict:
    import signal
    import time

    import jax
    import optax

    from infinitevl_jax.training import trainer

    assert jax.device_count() == 8, jax.devices()
    cache = os.path.join(work, "jax_cache")
    out: dict = {"timings": {}}

    def kill_at_k(step, _):
        if step == K:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt = os.path.join(work, "sft")
    t = time.perf_counter()
    first = trainer.run(train_cfg(ckpt, "sft", N, "1,8,1", cache), on_step=kill_at_k)
    out["timings"]["sft_1x8x1"] = time.perf_counter() - t
    out["first"] = {"losses": first["losses"], "step": first["step"], "preempted": first["preempted"],
                    "devices": len({d for x in jax.tree.leaves(first["trainable"]) for d in x.sharding.device_set}),
                    "trainable_specs": _specs(first["trainable"])}

    t = time.perf_counter()
    second = trainer.run(train_cfg(ckpt, "sft", N, "2,2,2", cache))
    out["timings"]["resume_2x2x2"] = time.perf_counter() - t
    mesh = second["fns"].mesh
    save_flat(os.path.join(work, "sft_trainable.npz"), second["trainable"])
    mu = optax.tree_utils.tree_get(second["opt_state"], "mu")  # after the steps: still laid out like the params
    out["second"] = {"losses": second["losses"], "step": second["step"], "mesh": dict(mesh.shape),
                     "trainable_specs": _specs(second["trainable"]),
                     "mu_like_params": all(mu[k].sharding == v.sharding for k, v in second["trainable"].items()),
                     "frozen_on_mesh": all(x.sharding.mesh.shape == mesh.shape for x in second["frozen"].values())}

    t = time.perf_counter()
    lora = trainer.run(train_cfg(None, "lora", LORA_STEPS, "1,8,1", cache, LORA[0].format(ckpt), *LORA[1:]))
    out["timings"]["lora_1x8x1"] = time.perf_counter() - t
    out["lora"] = {"losses": lora["losses"], "adapter_specs": _specs(lora["trainable"])}
    save_flat(os.path.join(work, "lora_trainable.npz"), lora["trainable"])

    t = time.perf_counter()  # the first run's sharded initialisation again (its compilation is cached)
    cfg = train_cfg(None, "sft", N, "1,8,1", cache)
    _, built = trainer.build(trainer.student_config(cfg), cfg, cfg.seed, mesh=trainer.train_mesh(cfg))
    save_flat(os.path.join(work, "built_1x8x1.npz"), built)
    out["built_specs"] = _specs(built)
    out["timings"]["build_1x8x1"] = time.perf_counter() - t
    return out


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import argparse
    import json

    sys.path.insert(0, ROOT)
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = run(args.work)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
