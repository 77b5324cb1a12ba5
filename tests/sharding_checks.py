"""Sharded-vs-single-device checks on 8 fake CPU devices; run by ``tests/test_sharding.py`` in a subprocess.

    python tests/sharding_checks.py --out results.json

Sets the device count itself (before JAX starts), so the rest of the test suite keeps its one CPU device. Writes the
measured differences as JSON; the assertions live in ``test_sharding.py``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import faulthandler  # noqa: E402
import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.sharded_step import loss_and_grads, random_batch  # noqa: E402
from infinitevl_jax import distributed, sharding  # noqa: E402
from infinitevl_jax.config import tiny_infinitevl  # noqa: E402

MESHES = {"8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "1,2,4": (1, 2, 4), "2,2,2": (2, 2, 2)}


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_abs(a) -> float:
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a))


def run() -> dict:
    assert jax.device_count() == 8, jax.devices()
    out: dict = {"timings": {}}
    config = tiny_infinitevl(num_hidden_layers=4)
    t = time.perf_counter()
    fsdp_mesh = sharding.make_mesh(MESHES["1,8,1"])
    model = sharding.create_model(config, fsdp_mesh)
    out["timings"]["create_model"] = time.perf_counter() - t

    # Per-device parameter bytes measured from the shards.
    params = nnx.state(model, nnx.Param)
    per_device = sharding.bytes_per_device(params)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    out["param_bytes"] = {"total": total, "per_device": sorted(per_device.values()), "devices": len(per_device)}

    # The single-device reference: the same values on one device, no mesh.
    graphdef, state = nnx.split(model)
    one = jax.devices()[0]
    ref_state = jax.device_put(state, one)

    host = random_batch(config, batch=8, seq=32, seed=1)

    def fn(state, batch):
        loss, logits, grads = loss_and_grads(nnx.merge(graphdef, state), batch)
        return loss, logits, grads

    t = time.perf_counter()
    ref = jax.jit(fn)(ref_state, jax.device_put(host, one))
    out["timings"]["single_step"] = time.perf_counter() - t
    out["reference_scale"] = {"loss": float(ref[0]), "logits": _max_abs(ref[1]), "grads": _max_abs(ref[2])}

    out["meshes"] = {}
    for name, shape in MESHES.items():
        t = time.perf_counter()
        mesh = sharding.make_mesh(shape)
        sharded = jax.device_put(ref_state, sharding.state_shardings(ref_state, mesh, config))
        batch = distributed.global_batch(host, mesh, 8)
        with jax.set_mesh(mesh):
            loss, logits, grads = jax.jit(fn)(sharded, batch)
        out["meshes"][name] = {
            "loss": abs(float(loss) - float(ref[0])),
            "logits": _max_diff(logits, ref[1]),
            "grads": _max_diff(grads, ref[2]),
            "grad_specs_sharded": sum(1 for g in jax.tree.leaves(grads) if any(s is not None for s in g.sharding.spec)),
            "seconds": time.perf_counter() - t,
        }

    # Checkpoint saved on (1,8,1), restored onto (2,2,2) and onto one device.
    from infinitevl_jax import checkpoint

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        target_mesh = sharding.make_mesh(MESHES["2,2,2"])
        if hasattr(checkpoint, "save") and hasattr(checkpoint, "load"):
            out["checkpoint_api"] = "infinitevl_jax.checkpoint"
            checkpoint.save(path, model)
            on_mesh = nnx.state(checkpoint.load(path, target_mesh), nnx.Param)
            on_one = nnx.state(checkpoint.load(path), nnx.Param)
        else:
            import orbax.checkpoint as ocp

            out["checkpoint_api"] = "orbax"
            with ocp.StandardCheckpointer() as ckpt:
                ckpt.save(path, nnx.state(model, nnx.Param))
                ckpt.wait_until_finished()
                on_mesh = ckpt.restore(path, nnx.state(sharding.abstract_model(config, target_mesh), nnx.Param))
                on_one = ckpt.restore(path, nnx.state(sharding.abstract_model(config), nnx.Param))
    saved = nnx.state(model, nnx.Param)
    expect_mesh = sharding.state_shardings(saved, target_mesh, config)
    out["checkpoint"] = {
        "to_2x2x2": _max_diff(on_mesh, saved),
        "to_single": _max_diff(on_one, saved),
        "2x2x2_shardings_match": all(
            a.sharding.is_equivalent_to(b, a.ndim)
            for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(expect_mesh))),
        "2x2x2_device_count": len({d for a in jax.tree.leaves(on_mesh) for d in a.sharding.device_set}),
        "single_device_count": len({d for a in jax.tree.leaves(on_one) for d in a.sharding.device_set}),
    }
    out["timings"]["checkpoint"] = time.perf_counter() - t
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = run()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
