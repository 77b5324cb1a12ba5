"""The trainer on a device mesh (8 fake CPU devices) against the single-device run, plus the ``mesh`` config key.

The 8-device runs happen in a subprocess (``tests/training_mesh_checks.py``) that sets
``--xla_force_host_platform_device_count=8`` before JAX starts; the single-device references run here, on the suite's
one CPU device, with the same configs (float32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from infinitevl_jax.training import config as tc, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from training_mesh_checks import K, LORA, LORA_STEPS, N, train_cfg  # noqa: E402

REL = 1e-5
GDN_Q = "language_model/layers/blocks/layers/1:linear_attention/self_attn/q_proj/kernel"


def mesh_runs(work) -> dict:
    out = work / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "training_mesh_checks.py"), "--work", str(work),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"training_mesh_checks.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _losses(d) -> dict[int, float]:
    return {int(k): v for k, v in d.items()}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def _flat(tree) -> dict:
    if isinstance(next(iter(tree.values())), dict):
        return {f"{k}/{ab}": np.asarray(v) for k, d in tree.items() for ab, v in d.items()}
    return {k: np.asarray(v) for k, v in tree.items()}


def _rel_diff(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    return max(float(np.linalg.norm(got[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-12)) for k in want)


def test_mesh_key_is_validated():
    assert tc.load("configs/demo_smoke.yaml").mesh == ""
    assert tc.load("configs/demo_smoke.yaml", ["mesh=2,1,-1,1"]).mesh == "2,1,-1,1"
    for bad in ("mesh=1,8", "mesh=-1,-1,1", "mesh=1,0,1", "mesh=a,b,c", "mesh=8"):
        with pytest.raises(tc.TrainConfigError, match="mesh"):
            tc.load("configs/demo_smoke.yaml", [bad])
    with pytest.raises(ValueError, match="mesh='3,-1,1'"):
        trainer.train_mesh(tc.load("configs/demo_smoke.yaml", ["mesh=3,-1,1"]))  # 3 does not divide 1 device
    assert trainer.train_mesh(tc.load("configs/demo_smoke.yaml")) is None  # one device, no mesh key: no mesh


def test_trainer_on_meshes_matches_single_device(tmp_path):
    """One test (one subprocess, whichever xdist worker runs it): stage II on fsdp=8 up to a SIGTERM checkpoint,
    resumed on 2x2x2; LoRA on fsdp=8; the sharded initialisation -- each against the same run on one device."""
    r = mesh_runs(tmp_path)
    sft = trainer.run(train_cfg(None, "sft", N))
    lora = trainer.run(train_cfg(None, "lora", LORA_STEPS, "", None, LORA[0].format(tmp_path / "sft"), *LORA[1:]))

    # Stage II on 1,8,1 (steps 1..K, then SIGTERM: a checkpoint at K) ...
    first, want = r["first"], sft["losses"]
    assert first["preempted"] and first["step"] == K
    got = _losses(first["losses"])
    assert sorted(got) == list(range(1, K + 1))
    assert all(_close(got[s], want[s]) for s in got), ("1,8,1", got, want)
    # ... resumed from that checkpoint on 2,2,2 (steps K+1..N): the uninterrupted single-device run's losses.
    second = r["second"]
    assert second["mesh"] == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2} and second["step"] == N
    got = _losses(second["losses"])
    assert sorted(got) == list(range(K + 1, N + 1))
    assert all(_close(got[s], want[s]) for s in got), ("2,2,2 resumed", got, want)
    # Parameters: close, not equal -- e.g. the attention key bias has a zero true gradient, so Adam scales
    # summation-order noise up to its step size (a 2e-4 relative difference there, 1e-6 elsewhere).
    assert _rel_diff(dict(np.load(tmp_path / "sft_trainable.npz")), _flat(sft["trainable"])) < 1e-2

    # Layouts: trainable parameters sharded (and kept so by the step), optimizer state like its parameters.
    assert first["devices"] == 8
    assert first["trainable_specs"][f"['{GDN_Q}']"] == [None, "fsdp"]  # [blocks, embed, heads*dim]: embed / 8
    assert second["trainable_specs"][f"['{GDN_Q}']"] == [None, "fsdp", "tensor"]
    assert second["mu_like_params"] and second["frozen_on_mesh"]

    # LoRA on 1,8,1 from the stage-II checkpoint.
    got = _losses(r["lora"]["losses"])
    assert sorted(got) == list(range(1, LORA_STEPS + 1))
    assert all(_close(got[s], lora["losses"][s]) for s in got), ("lora 1,8,1", got, lora["losses"])
    assert _rel_diff(dict(np.load(tmp_path / "lora_trainable.npz")), _flat(lora["trainable"])) < 1e-4
    specs = r["lora"]["adapter_specs"]
    assert specs[f"['{GDN_Q}']['a']"] == [None, "fsdp"] and specs[f"['{GDN_Q}']['b']"] == []
    down = "language_model/layers/blocks/layers/1:linear_attention/mlp/down_proj/kernel"  # [blocks, mlp, embed]
    assert specs[f"['{down}']['a']"] == [] and specs[f"['{down}']['b']"] == [None, None, "fsdp"]

    # The sharded initialisation gives today's single-device values for the same seed.
    assert r["built_specs"][f"['{GDN_Q}']"] == [None, "fsdp"]
    cfg = train_cfg(None, "sft", N)
    _, built = trainer.build(trainer.student_config(cfg), cfg, cfg.seed)
    got = dict(np.load(tmp_path / "built_1x8x1.npz"))
    assert sorted(got) == sorted(built)
    for k, v in built.items():
        np.testing.assert_allclose(got[k], np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=k)
