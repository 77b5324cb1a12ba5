"""Training config validation, student-from-teacher init, and a few SFT steps reducing the loss (CPU, tiny)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.training import config as tc, params as P, trainer

SMOKE = "configs/demo_smoke.yaml"


def test_config_rejects_unknown_key_and_wrong_type():
    with pytest.raises(tc.TrainConfigError, match="optim.lrr"):
        tc.load(SMOKE, ["optim.lrr=1"])
    with pytest.raises(tc.TrainConfigError, match="optim.lr: expected float"):
        tc.load(SMOKE, ["optim.lr=fast"])
    assert tc.load(SMOKE, ["optim.lr=1e-3"]).optim.lr == 1e-3


@pytest.mark.parametrize("name", ["stage1_layerwise", "stage1_e2e", "stage2_sft", "stage3_long_lora", "demo"])
def test_release_configs_load(name):
    tc.load(f"configs/{name}.yaml")


def test_student_from_teacher_shares_params_and_mimic_init():
    cfg = tc.load(SMOKE)
    s_cfg = trainer.student_config(cfg)
    t_cfg = trainer.resolve_model_config("tiny_qwen2_5_vl", dict(cfg.model.text_overrides))
    _, s = trainer.build(s_cfg, cfg, 1)
    _, t = trainer.build(t_cfg, cfg, 2)
    out = P.init_student_from_teacher(s, s_cfg, t, t_cfg)
    tl, sl = P.per_layer(t, t_cfg), P.per_layer(out, s_cfg)
    np.testing.assert_array_equal(sl["language_model/embed_tokens/embedding"], tl["language_model/embed_tokens/embedding"])
    np.testing.assert_array_equal(sl["language_model/layers/1/mlp/up_proj/kernel"], tl["language_model/layers/1/mlp/up_proj/kernel"])
    np.testing.assert_array_equal(sl["language_model/layers/0/self_attn/q_proj/kernel"], tl["language_model/layers/0/self_attn/q_proj/kernel"])
    g = "language_model/layers/2/self_attn/"
    assert np.all(sl[g + "A_log"] == 0) and np.all(sl[g + "a_proj/kernel"] == 0) and np.all(sl[g + "b_proj/kernel"] == 0)
    np.testing.assert_allclose(sl[g + "dt_bias"], math.log(math.expm1(0.001)), rtol=1e-5)
    conv = sl[g + "q_conv1d"]
    assert np.all(conv[-1] == 1) and np.all(conv[:-1] == 0)
    assert not np.array_equal(sl[g + "q_proj/kernel"][:, :4], tl["language_model/layers/2/self_attn/q_proj/kernel"][:, :4])


def test_trainable_selection_and_no_decay():
    cfg = tc.load(SMOKE)
    _, flat = trainer.build(trainer.student_config(cfg), cfg, 0)
    gdn = P.select(flat, [tc.GDN_MIXER])
    assert gdn and all(":linear_attention/self_attn/" in n for n in gdn)
    nd = set(P.select(gdn, tc.NO_DECAY))
    assert any(n.endswith("A_log") for n in nd) and any(n.endswith("dt_bias") for n in nd)
    assert not any(n.endswith("q_proj/kernel") for n in nd)


def test_sft_steps_reduce_loss(tmp_path):
    cfg = tc.load(SMOKE, [f"checkpoint.dir={tmp_path}", "optim.steps=12", "optim.lr=3e-3", "trainable=['.*']",
                          "model.preset=tiny_qwen2_5_vl", "optim.warmup_frac=0.0", "log.every=1"])
    res = trainer.run(cfg)
    losses = [res["losses"][i] for i in sorted(res["losses"])]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (tmp_path / "metrics.jsonl").exists()
