"""Whole-model parity with PyTorch: the transformers Qwen2.5-VL teacher, and a hybrid with a PyTorch GDN oracle."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from infinitevl_jax import config as C  # noqa: E402
from infinitevl_jax.checkpoint import load_hf_state_dict  # noqa: E402
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration, prepare_inputs  # noqa: E402
from model_inputs import multimodal_batch  # noqa: E402
from torch_oracles import tiny_hf_model, to_torch  # noqa: E402


def _hf_logits(hf, batch, position_ids):
    with torch.no_grad():
        out = hf(
            input_ids=to_torch(batch["input_ids"], torch.long), attention_mask=to_torch(batch["attention_mask"], torch.long),
            pixel_values=to_torch(batch["pixel_values"]), image_grid_thw=to_torch(batch["image_grid_thw"], torch.long),
            pixel_values_videos=to_torch(batch["pixel_values_videos"]),
            video_grid_thw=to_torch(batch["video_grid_thw"], torch.long),
            second_per_grid_ts=to_torch(batch["second_per_grid_ts"], torch.float32),
            position_ids=to_torch(position_ids, torch.long),
        )
    return out.logits.float().numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_teacher_parity(tie):
    cfg = C.tiny_qwen2_5_vl(num_hidden_layers=3, tie_word_embeddings=tie)
    hf = tiny_hf_model(cfg, tie=tie)
    ours_cfg = C.InfiniteVLConfig.from_hf(hf.config.to_dict())
    assert ours_cfg.text.layer_types == ("full_attention",) * 3
    model = InfiniteVLForConditionalGeneration(ours_cfg, rngs=nnx.Rngs(1))
    load_hf_state_dict(model, hf.state_dict())
    batch = multimodal_batch(ours_cfg)
    inputs = prepare_inputs(ours_cfg, **batch)
    ours = np.asarray(model.forward(**inputs))
    ref = _hf_logits(hf, batch, np.asarray(inputs["position_ids"]))
    real = batch["attention_mask"].astype(bool)
    diff = np.abs(ours[real] - ref[real]).max()
    assert diff <= 1e-4, diff
    assert np.abs(ref[real]).max() > 1e-2  # logits are not trivially small


def test_hybrid_parity_longer_than_window():
    layer_types = ["sliding_attention", "linear_attention", "linear_attention", "linear_attention"] * 2
    cfg = C.tiny_infinitevl(num_hidden_layers=8, sliding_window=8)
    hf_types = ["sliding_attention" if t == "sliding_attention" else "full_attention" for t in layer_types]
    hf = tiny_hf_model(cfg, layer_types=hf_types, gdn_layers=[i for i in range(8) if i % 4])
    model = InfiniteVLForConditionalGeneration(cfg, rngs=nnx.Rngs(1))
    load_hf_state_dict(model, hf.state_dict())
    batch = multimodal_batch(cfg, pad_left=0)  # the release's GDN ignores padding: compare unpadded sequences
    batch["attention_mask"][:] = 1
    assert batch["input_ids"].shape[1] > 4 * cfg.text.sliding_window
    inputs = prepare_inputs(cfg, **batch)
    ours = np.asarray(model.forward(**inputs))
    ref = _hf_logits(hf, batch, np.asarray(inputs["position_ids"]))
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-4, diff
