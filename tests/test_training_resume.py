"""SIGTERM at step k, then restart: losses of steps k+1..n are bit-identical to an uninterrupted run (CPU, f32)."""

import os
import signal

from infinitevl_jax.training import config as tc, trainer

N, K = 8, 3


def _cfg(d):
    return tc.load("configs/demo_smoke.yaml", [
        f"checkpoint.dir={d}", f"optim.steps={N}", "trainable=['.*']", "model.preset=tiny_qwen2_5_vl",
        "checkpoint.every=1000", "checkpoint.use_async=true", "log.every=1", "model.compute_dtype=float32"])


def test_sigterm_and_resume_is_exact(tmp_path):
    full = trainer.run(_cfg(tmp_path / "full"))["losses"]

    def kill_at_k(step, _):
        if step == K:
            os.kill(os.getpid(), signal.SIGTERM)

    first = trainer.run(_cfg(tmp_path / "cut"), on_step=kill_at_k)
    assert first["preempted"] and first["step"] == K
    second = trainer.run(_cfg(tmp_path / "cut"))
    assert not second["preempted"]
    assert sorted(second["losses"]) == list(range(K + 1, N + 1))
    for s in range(K + 1, N + 1):
        assert second["losses"][s] == full[s], (s, second["losses"][s], full[s])
