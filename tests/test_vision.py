"""Qwen2.5-VL vision tower: parity with transformers, host-side layout and validation."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.checkpoint import CheckpointMismatchError, load_hf_vision_state_dict
from infinitevl_jax.config import tiny_vision
from infinitevl_jax.modeling.vision import (
    PAD_SEGMENT, VisionTower, check_grids, vision_layout,
)

torch = pytest.importorskip("torch")
qwen2_5_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig  # noqa: E402

CFG = tiny_vision()
# 56-px windows are 2x2 merged tokens. The image's 6x5 merged grid has full windows and partial ones at the right and
# bottom-right edges; the video's 3x4 merged grid has partial windows at the bottom, over 2 temporal slices.
IMAGE = (1, 12, 10)
VIDEO = (2, 6, 8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf_cfg = Qwen2_5_VLVisionConfig(
        depth=CFG.depth, hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size, num_heads=CFG.num_heads,
        in_channels=CFG.in_channels, patch_size=CFG.patch_size, temporal_patch_size=CFG.temporal_patch_size,
        spatial_merge_size=CFG.spatial_merge_size, window_size=CFG.window_size, out_hidden_size=CFG.out_hidden_size,
        fullatt_block_indexes=list(CFG.fullatt_block_indexes), hidden_act="silu",
    )
    hf_cfg._attn_implementation = "eager"
    hf = qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval()
    with torch.no_grad():  # randomise every parameter, biases and norm weights included
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    tower = VisionTower(CFG, rngs=nnx.Rngs(0))
    load_hf_vision_state_dict(tower, tensors)
    return hf, tower


@nnx.jit
def _forward(tower, pixel_values, layout):
    return tower(pixel_values, layout)


def _pixels(grids, seed=0):
    n = int(sum(np.prod(g) for g in grids))
    return np.random.default_rng(seed).standard_normal((n, CFG.patch_dim)).astype(np.float32)


def _reference(hf, pixels, grids):
    with torch.no_grad():
        out = hf(hidden_states=torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy()


@pytest.mark.parametrize("grids", [[IMAGE], [VIDEO], [IMAGE, VIDEO]], ids=["image", "video", "image+video"])
def test_parity_with_transformers(models, grids):
    hf, tower = models
    pixels = _pixels(grids)
    ours = np.asarray(_forward(tower, jnp.asarray(pixels), vision_layout(grids, CFG)))
    ref = _reference(hf, pixels, grids)
    assert ours.shape == ref.shape == (len(pixels) // CFG.merge_unit, CFG.out_hidden_size)
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)


def test_bucket_padding_leaves_real_tokens_unchanged(models):
    hf, tower = models
    grids = [VIDEO, IMAGE]
    pixels = _pixels(grids, seed=1)
    n, pad_to = len(pixels), 320
    garbage = np.full((pad_to - n, CFG.patch_dim), np.nan, np.float32)  # padding rows must not reach real ones
    garbage[::2] = 1e4
    layout = vision_layout(grids, CFG, pad_to=pad_to)
    ours = np.asarray(_forward(tower, jnp.asarray(np.concatenate([pixels, garbage])), layout))
    assert ours.shape == (pad_to // CFG.merge_unit, CFG.out_hidden_size)
    assert np.isfinite(ours).all()
    np.testing.assert_array_less(np.abs(ours[: n // CFG.merge_unit] - _reference(hf, pixels, grids)).max(), 1e-4)


def _segments_from_cu(cu):
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu))


@pytest.mark.parametrize("grids", [[IMAGE, VIDEO], [(1, 8, 8), (3, 2, 6)], [(2, 4, 4)]],
                         ids=["partial-windows", "exact-windows", "one-window"])
def test_layout_matches_transformers_helpers(grids):
    from transformers import vision_utils as vu

    grid_t = torch.tensor(grids)
    m, unit = CFG.spatial_merge_size, CFG.merge_unit
    window_index, cu_windows = vu.get_vision_window_index(grid_t, m, CFG.window_size, CFG.patch_size)
    cu_full = vu.get_vision_cu_seqlens(grid_t)
    positions = vu.get_vision_position_ids(grid_t, m).numpy()
    layout = vision_layout(grids, CFG)
    perm = np.asarray(layout.patch_perm)
    np.testing.assert_array_equal(perm[::unit] // unit, window_index.numpy())
    np.testing.assert_array_equal(np.asarray(layout.token_unperm), np.argsort(window_index.numpy()))
    # Same partition into segments (ids may differ only by relabelling; here they are consecutive in both).
    np.testing.assert_array_equal(np.asarray(layout.window_segment_ids), _segments_from_cu(cu_windows.numpy()))
    # Full blocks: HF's segments are contiguous frames before permuting; the window permutation stays within a frame.
    np.testing.assert_array_equal(np.asarray(layout.full_segment_ids), _segments_from_cu(cu_full.numpy())[perm])
    np.testing.assert_array_equal(np.asarray(layout.positions), positions[perm])
    assert np.asarray(layout.valid).all()


def test_layout_padding():
    grids = [IMAGE]
    n = int(np.prod(IMAGE))
    layout = vision_layout(grids, CFG, pad_to=n + 3 * CFG.merge_unit)
    assert layout.num_rows == n + 12
    np.testing.assert_array_equal(np.asarray(layout.valid), np.arange(n + 12) < n)
    np.testing.assert_array_equal(np.asarray(layout.patch_perm)[n:], np.arange(n, n + 12))
    assert (np.asarray(layout.window_segment_ids)[n:] == PAD_SEGMENT).all()
    assert (np.asarray(layout.full_segment_ids)[n:] == PAD_SEGMENT).all()
    assert (np.asarray(layout.window_segment_ids)[:n] >= 0).all()
    with pytest.raises(ValueError, match="pad_to"):
        vision_layout(grids, CFG, pad_to=n - 4)
    with pytest.raises(ValueError, match="pad_to"):
        vision_layout(grids, CFG, pad_to=n + 2)


@pytest.mark.parametrize("grids, rows, match", [
    ([IMAGE], 100, "pixel_values has 100"),
    ([IMAGE, VIDEO], int(np.prod(IMAGE)), r"sum\(t\*h\*w\) = 216"),
    ([(1, 12, 9)], 108, "divisible by the spatial merge size"),
    ([(1, 6, 12), (1, 12, 7)], 156, r"rows \[1\].*divisible"),
    ([(0, 12, 10)], 0, "non-positive"),
    ([(1, -2, 4)], -8, "non-positive"),
    ([(1, 12)], 12, r"shape \[n, 3\]"),
])
def test_check_grids_errors(grids, rows, match):
    with pytest.raises(ValueError, match=match):
        check_grids(np.array(grids), rows, CFG)


def test_check_grids_accepts_valid():
    grids = check_grids(torch.tensor([IMAGE, VIDEO]), int(np.prod(IMAGE) + np.prod(VIDEO)), CFG)
    assert grids.dtype == np.int64 and grids.shape == (2, 3)


def test_tower_rejects_wrong_pixel_shape():
    tower = VisionTower(CFG, rngs=nnx.Rngs(0))
    layout = vision_layout([IMAGE], CFG)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        tower(jnp.zeros((int(np.prod(IMAGE)) + 4, CFG.patch_dim)), layout)


def test_params_are_stacked_and_carry_logical_axes():
    tower = VisionTower(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(tower, nnx.Param)
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (CFG.depth, CFG.hidden_size, 3 * CFG.hidden_size)
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) == 18  # patch embed, 12 per stacked block, 5 in the merger
    for path, p in leaves:
        axes = p.get_metadata().get("logical_axes")
        stacked = path[0].key == "blocks"
        assert axes is not None and len(axes) + stacked == p.ndim, (jax.tree_util.keystr(path), axes)


def test_vision_state_dict_errors_are_reported_together(models):
    hf, _ = models
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    del tensors["blocks.2.attn.qkv.bias"]
    tensors["blocks.9.norm1.weight"] = np.ones(CFG.hidden_size)
    tensors["merger.mlp.2.weight"] = tensors["merger.mlp.2.weight"].T
    tower = VisionTower(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_vision_state_dict(tower, tensors)
    msg = str(err.value)
    assert "1 missing: blocks.2.attn.qkv.bias" in msg
    assert "1 unexpected: blocks.9.norm1.weight" in msg
    assert "merger.mlp.2.weight: checkpoint (128, 64)" in msg
