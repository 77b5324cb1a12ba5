"""Reading Hugging Face configs of both model types and layouts; our own strict serialisation."""

import logging

import pytest

from infinitevl_jax import config as C

RELEASE = {  # the release's config.json shape: flat text fields, nested vision_config, GDN fields absent
    "model_type": "infinite_vl", "architectures": ["InfiniteVLForConditionalGeneration"], "auto_map": {"x": "y"},
    "torch_dtype": "bfloat16", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "sliding_window": 8192, "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 2048, "window_size": 112, "tokens_per_second": 2,
                      "fullatt_block_indexes": [7, 15, 23, 31], "patch_size": 14, "temporal_patch_size": 2,
                      "spatial_merge_size": 2, "in_chans": 3, "hidden_act": "silu"},
}


def test_release_config_matches_preset(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = C.InfiniteVLConfig.from_hf(RELEASE)
    assert cfg == C.infinitevl_4b()
    assert "ignored: architectures, auto_map, torch_dtype" in caplog.text
    assert cfg.text.layer_types.count(C.SWA) == 9 and cfg.text.layer_types.count(C.GDN) == 27


def test_layer_types_override_and_aliases():
    raw = dict(RELEASE, num_hidden_layers=4, layer_types=["attention", "linear_attention", "gdn", "full_attention"])
    cfg = C.InfiniteVLConfig.from_hf(raw)
    assert cfg.text.layer_types == (C.SWA, C.GDN, C.GDN, C.FULL)


def test_teacher_nested_text_config_and_flat_layout_agree():
    text = {k: RELEASE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "rms_norm_eps")}
    common = {k: RELEASE[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id", "vision_config", "tie_word_embeddings")}
    nested = {"model_type": "qwen2_5_vl", **common, "text_config": {
        **text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 70}}
    flat = {"model_type": "qwen2_5_vl", **common, **text, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    a, b = C.InfiniteVLConfig.from_hf(nested), C.InfiniteVLConfig.from_hf(flat)
    assert a == b == C.qwen2_5_vl_3b()


@pytest.mark.parametrize("change,key", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "yarn"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 64}, "head_dim"),
    ({"layer_types": ["attention"] * 35}, "layer_types"),
    ({"layer_types": ["mamba"] * 36}, "mamba"),
    ({"num_linear_key_value_heads": 8}, "num_linear_key_value_heads"),
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 16, 16]}}, "mrope_section"),
])
def test_unsupported_or_contradicting_values_name_the_key(change, key):
    with pytest.raises(C.ConfigError, match=key):
        C.InfiniteVLConfig.from_hf(dict(RELEASE, **change))


def test_own_serialisation_round_trips_and_rejects_unknown_keys():
    cfg = C.tiny_infinitevl()
    assert C.InfiniteVLConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["text"]["hiden_size"] = 3
    with pytest.raises(C.ConfigError, match="hiden_size"):
        C.InfiniteVLConfig.from_dict(bad)


def test_from_hf_reads_a_directory(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(RELEASE))
    assert C.InfiniteVLConfig.from_hf(tmp_path) == C.infinitevl_4b()
    with pytest.raises(FileNotFoundError):
        C.InfiniteVLConfig.from_hf(tmp_path / "missing")
