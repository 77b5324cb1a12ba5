"""Sharding on 8 fake CPU devices vs one device, plus mesh/rule unit tests.

The 8-device checks run in a subprocess (``tests/sharding_checks.py``) that sets
``--xla_force_host_platform_device_count=8`` before JAX starts, so the rest of the suite keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infinitevl_jax import distributed, sharding
from infinitevl_jax.config import tiny_infinitevl

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


class _FakeMesh:
    def __init__(self, **sizes):
        self.axis_names = sharding.MESH_AXES
        self.axis_sizes = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)


def test_mesh_config_fill_and_errors():
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.MeshConfig.parse("2,1,-1,1").resolve(8)["fsdp"] == 4
    with pytest.raises(ValueError):
        sharding.MeshConfig(data=3, fsdp=-1).resolve(8)
    with pytest.raises(ValueError):
        sharding.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_rules_replicate_what_does_not_divide():
    mesh = _FakeMesh(fsdp=2, tensor=4)
    ext = sharding.logical_extents(tiny_infinitevl())  # 4 query heads, 2 KV heads, 2 GDN heads
    # Stacked kernel [layers, embed, kv_heads*head_dim]: 32 columns divide by 4 but 2 KV heads do not.
    assert sharding.logical_to_spec(("embed", "kv_heads"), (2, 64, 32), mesh, extents=ext) == P(None, "fsdp")
    assert sharding.logical_to_spec(("embed", "q_heads"), (2, 64, 64), mesh, extents=ext) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (1024, 64), mesh) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("norm",), (64,), mesh) == P()
    # The batch takes every batch axis that divides it, in order.
    assert sharding.logical_to_spec(("batch", "seq"), (4, 8), _FakeMesh(dcn=2, data=2, fsdp=2)) == P(("dcn", "data"))
    with pytest.raises(KeyError):
        sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_every_parameter_has_logical_axes():
    from flax import nnx

    model = sharding.abstract_model(tiny_infinitevl(num_hidden_layers=4))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_metadata().get("logical_axes") is not None, path


def test_detect_cluster():
    assert distributed.detect_cluster({}) == "single"
    assert distributed.detect_cluster({"INFINITEVL_COORDINATOR": "h:1234"}) == "explicit"
    assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}) == "slurm"
    assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) == "single"
    assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_checks.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"sharding_checks.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["8,1,1", "1,8,1", "1,2,4", "2,2,2"])
def test_sharded_step_equals_single_device(eight_devices, mesh):
    r = eight_devices["meshes"][mesh]
    assert r["loss"] < TOL and r["logits"] < TOL and r["grads"] < TOL, r


def test_fsdp8_parameter_bytes(eight_devices):
    b = eight_devices["param_bytes"]
    assert b["devices"] == 8
    # 1/8 of the total plus the small replicated tensors (norms, biases of unsharded heads, conv taps).
    assert max(b["per_device"]) < b["total"] / 8 * 1.15, b


def test_checkpoint_restores_on_other_meshes(eight_devices):
    c = eight_devices["checkpoint"]
    assert c["to_2x2x2"] == 0.0 and c["to_single"] == 0.0, c
    assert c["2x2x2_shardings_match"] and c["2x2x2_device_count"] == 8 and c["single_device_count"] == 1, c
