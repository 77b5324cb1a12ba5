"""Shared tiny multimodal batches for model tests."""

from __future__ import annotations

import numpy as np

IMAGE_GRID = (1, 12, 10)  # 3 x 3 windows of 4 x 4 patches: full ones and partial ones at the right edge
VIDEO_GRID = (2, 4, 8)  # grid_t = 2


def span(cfg, token, grid):
    n = int(np.prod(grid)) // cfg.vision.merge_unit
    return [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id]


def multimodal_batch(cfg, seed=0, pad_left=4, text_tokens=900):
    """Row 0: left padding, text, an image, text. Row 1: text, a video, text. Same length."""
    rng = np.random.default_rng(seed)
    txt = lambda n: list(rng.integers(0, text_tokens, n))
    row0 = txt(5) + span(cfg, cfg.image_token_id, IMAGE_GRID) + txt(6)
    row1 = txt(3) + span(cfg, cfg.video_token_id, VIDEO_GRID)
    T = pad_left + len(row0)
    row1 = row1 + txt(T - len(row1))
    ids = np.array([[cfg.pad_token_id] * pad_left + row0, row1], np.int32)
    mask = np.ones_like(ids)
    mask[0, :pad_left] = 0
    pd = cfg.vision.patch_dim
    return dict(
        input_ids=ids, attention_mask=mask,
        pixel_values=rng.standard_normal((int(np.prod(IMAGE_GRID)), pd)).astype(np.float32),
        image_grid_thw=np.array([IMAGE_GRID]),
        pixel_values_videos=rng.standard_normal((int(np.prod(VIDEO_GRID)), pd)).astype(np.float32),
        video_grid_thw=np.array([VIDEO_GRID]),
        second_per_grid_ts=np.array([1.0]),
    )
