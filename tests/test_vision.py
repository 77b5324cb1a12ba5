"""Qwen2.5-VL vision tower: parity with transformers, host-side layout and validation."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.checkpoint import CheckpointMismatchError, load_hf_vision_state_dict
from infinitevl_jax.config import VisionConfig, tiny_vision
from infinitevl_jax.modeling.vision import (
    PAD_SEGMENT, VisionLayout, VisionTower, blocked_segment_attention, check_grids, segment_attention, vision_layout,
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


# ---------------------------------------------------------------------------------------------------------- blocked attention
QWEN = VisionConfig()  # the real Qwen2.5-VL tower: 14-px patches, merge 2, 112-px windows (64 patch rows)
FRAME_448 = (1, 32, 32)


def _plan(layout):
    return layout.window_block, layout.window_banded, layout.full_block, layout.full_banded


def _longest_segment(ids):
    ids = ids[ids != PAD_SEGMENT]
    return int(np.max(np.unique(ids, return_counts=True)[1]))


# (config, grids, pad_to, attention, expected plan: window block, banded, full block, banded)
BLOCKED_CASES = {
    "448-frames": (QWEN, [FRAME_448] * 2, None, None, (64, False, 1024, False)),
    "224-frames": (QWEN, [(1, 16, 16)] * 4, None, None, (64, False, 256, False)),
    "448-video": (QWEN, [(2, 32, 32)], None, None, (64, False, 1024, False)),
    "476-frames-unaligned-windows": (QWEN, [(1, 34, 34)] * 3, None, None, (64, True, 1156, False)),
    "mixed-sizes": (CFG, [(1, 10, 14), (2, 6, 8), (1, 4, 4)], None, None, (16, True, 0, False)),
    "mixed-frames-banded": (CFG, [(1, 6, 10), (1, 4, 8)] * 5, None, None, (16, True, 64, True)),
    "video": (CFG, [(8, 8, 8)], None, None, (16, False, 64, False)),
    "video-grid-padded": (CFG, [(8, 8, 8)], 512 + 72, "grid", (16, False, 64, False)),
    "bucket-padded": (CFG, [(1, 10, 14), (2, 6, 8), (1, 4, 4)], 400, None, (16, True, 0, False)),
}


@pytest.mark.parametrize("case", list(BLOCKED_CASES))
@pytest.mark.parametrize("kind", ["window", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_attention_matches_dense(case, kind, dtype):
    config, grids, pad_to, attention, expected = BLOCKED_CASES[case]
    layout = vision_layout(grids, config, pad_to=pad_to, attention=attention)
    assert _plan(layout) == expected
    seg = np.asarray(getattr(layout, f"{kind}_segment_ids"))
    real = seg != PAD_SEGMENT
    # The layout's plan, and banded attention by the rounded-up longest segment (always valid), whatever the rule picks.
    block, banded = (layout.window_block, layout.window_banded) if kind == "window" else (layout.full_block,
                                                                                          layout.full_banded)
    plans = {(-(-_longest_segment(seg) // 16) * 16, True)} | ({(block, banded)} if block else set())
    rng = np.random.default_rng(len(seg))
    q, k, v = (jnp.asarray(rng.standard_normal((len(seg), 2, 16)), dtype) for _ in range(3))
    dense = np.asarray(jax.jit(segment_attention)(q, k, v, jnp.asarray(seg)), np.float32)
    for block, banded in sorted(plans):
        fn = jax.jit(blocked_segment_attention, static_argnames=("block", "banded"))
        out = np.asarray(fn(q, k, v, jnp.asarray(seg), block=block, banded=banded), np.float32)
        assert out.shape == dense.shape and np.isfinite(out).all()
        diff = out[real] - dense[real]
        if dtype == "float32":
            assert np.abs(diff).max() <= 1e-5, (block, banded)
        else:
            assert np.linalg.norm(diff) <= 2e-2 * np.linalg.norm(dense[real]), (block, banded)


def test_blocked_attention_pads_rows_to_whole_blocks():
    # 3 segments of 10, 6 and 4 rows, then 3 padding rows: 23 rows are 3 banded blocks of 8 (the last one padded).
    seg = jnp.asarray([0] * 10 + [1] * 6 + [2] * 4 + [PAD_SEGMENT] * 3)
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((23, 1, 4)), jnp.float32) for i in range(3))
    out = blocked_segment_attention(q, k, v, seg, block=10, banded=True)
    np.testing.assert_allclose(out[:20], segment_attention(q, k, v, seg)[:20], atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()  # padding rows: finite values of no meaning
    # A block-diagonal layout where a block holds segment 2 and the padding rows.
    seg = jnp.asarray([0] * 8 + [1] * 5 + [2] * 3 + [PAD_SEGMENT] * 7)
    out = blocked_segment_attention(q, k, v, seg, block=8, banded=False)
    np.testing.assert_allclose(out[:16], segment_attention(q, k, v, seg)[:16], atol=1e-6)
    assert np.isfinite(np.asarray(out)).all()


def test_attention_plans_of_448_frames():
    layout = vision_layout([FRAME_448] * 8, QWEN)
    assert layout.num_rows == 8192
    assert _plan(layout) == (64, False, 1024, False)  # 8x8-patch windows, one 1024-row block per frame
    assert _plan(vision_layout([(8, 32, 32)], QWEN)) == (64, False, 1024, False)  # the same as one video
    assert _plan(vision_layout([FRAME_448], QWEN)) == (64, False, 0, False)  # one frame: full attention is dense
    # 476x476 frames: 17x17 merged tokens, so the right column of windows is partial and windows straddle blocks.
    assert _plan(vision_layout([(1, 34, 34)] * 8, QWEN)) == (64, True, 1156, False)
    # Bucket padding: the plan depends only on the bucket and the config, so mixes of one bucket share it.
    bucket = vision_layout([FRAME_448] * 8, QWEN, pad_to=8192 + 256)
    assert _plan(bucket) == (64, True, 0, False)
    assert _plan(vision_layout([(1, 34, 34), (2, 20, 28), (1, 10, 4)], QWEN, pad_to=8192 + 256)) == _plan(bucket)
    assert _plan(bucket.dense()) == _plan(vision_layout([FRAME_448] * 8, QWEN, attention="dense")) == (0, False, 0,
                                                                                                       False)
    assert _plan(vision_layout([(1, 10, 14)], QWEN)) == (0, False, 0, False)  # small: dense
    with pytest.raises(ValueError, match="attention="):
        vision_layout([FRAME_448], QWEN, attention="sparse")


def test_attention_plans_are_static():
    a, b = vision_layout([FRAME_448] * 2, QWEN), vision_layout([FRAME_448] * 2, QWEN)
    assert len(jax.tree.leaves(a)) == 6  # the index arrays only
    assert jax.tree.structure(a) == jax.tree.structure(b) != jax.tree.structure(a.dense())
    # A layout built from the arrays alone (older call sites) attends densely.
    old = VisionLayout(*(getattr(a, f) for f in ("patch_perm", "token_unperm", "window_segment_ids",
                                                 "full_segment_ids", "positions", "valid")))
    assert _plan(old) == (0, False, 0, False)
    traces = []

    @jax.jit
    def f(layout):
        traces.append(_plan(layout))
        return layout.window_segment_ids.sum()

    f(a), f(b), f(a.dense())
    assert traces == [(64, False, 1024, False), (0, False, 0, False)]


TOWER_CASES = {
    "video": ([(8, 8, 8)], None),  # block-diagonal windows and frames
    "mixed-frames-banded": ([(1, 6, 10), (1, 4, 8)] * 5, None),  # banded windows and frames
    "bucket-padded": ([(1, 10, 14), (2, 6, 8), (1, 4, 4)], 400),  # banded windows, dense full blocks; + gradients
}


@pytest.mark.parametrize("case", list(TOWER_CASES))
def test_tower_blocked_matches_dense(case):
    grids, pad_to = TOWER_CASES[case]
    tower = VisionTower(CFG, rngs=nnx.Rngs(1))
    pixels = _pixels(grids, seed=2)
    n = len(pixels)
    if pad_to:
        pixels = np.concatenate([pixels, np.full((pad_to - n, CFG.patch_dim), np.nan, np.float32)])
    layout = vision_layout(grids, CFG, pad_to=pad_to)
    assert layout.window_block and _plan(layout) != _plan(layout.dense())
    blocked = np.asarray(_forward(tower, jnp.asarray(pixels), layout))
    dense = np.asarray(_forward(tower, jnp.asarray(pixels), layout.dense()))
    assert np.isfinite(blocked).all()
    real = n // CFG.merge_unit
    np.testing.assert_array_less(np.abs(blocked[:real] - dense[:real]).max(), 1e-5)
    if pad_to is None:
        return
    graphdef, state = nnx.split(tower)

    @jax.jit
    def grad(state, pixels, layout):  # the scanned lax.cond differentiates like the dense path
        loss = lambda st, px: jnp.sum(nnx.merge(graphdef, st)(px, layout)[:real] ** 2)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(state, pixels)

    g_blocked = jax.tree.leaves(grad(state, jnp.asarray(pixels), layout))
    g_dense = jax.tree.leaves(grad(state, jnp.asarray(pixels), layout.dense()))
    g_blocked[-1], g_dense[-1] = g_blocked[-1][:n], g_dense[-1][:n]  # pixel gradients: real rows
    for b, d in zip(g_blocked, g_dense):
        np.testing.assert_allclose(b, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
