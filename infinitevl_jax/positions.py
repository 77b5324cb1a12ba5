"""M-RoPE position ids, computed on the host by the release's rule (Qwen2.5-VL ``get_rope_index`` as published).

Text token: (p, p, p). Vision token: (t_idx, h_idx, w_idx) + offset, where the offset is the position the first pad
token would have had as text, and t_idx = floor(t * second_per_grid_t * tokens_per_second) (images: 0).
Text after a vision span resumes at (max over the span's three components) + 1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def rope_index_1d(
    input_ids: np.ndarray,
    image_grid_thw: Sequence[Sequence[int]] = (),
    video_grid_thw: Sequence[Sequence[int]] = (),
    second_per_grid_ts: Sequence[float] | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
    start: int = 0,
) -> np.ndarray:
    """Positions ``[3, T]`` (int32) of one unpadded sequence whose pad tokens are already expanded.

    ``image_grid_thw``/``video_grid_thw`` list the grids of the images/videos of this sequence in order;
    ``second_per_grid_ts[i]`` is video i's seconds per temporal grid step (temporal_patch_size / fps).
    ``start`` offsets every position (used to continue a stream).
    """
    ids = np.asarray(input_ids)
    T = ids.shape[0]
    out = np.empty((3, T), dtype=np.int64)
    m = spatial_merge_size
    images, videos = list(image_grid_thw), list(video_grid_thw)
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else [1.0] * len(videos)
    next_pos = start
    t = 0
    n_img = n_vid = 0
    while t < T:
        tok = ids[t]
        if tok == image_token_id or tok == video_token_id:
            if tok == image_token_id:
                if n_img >= len(images):
                    raise ValueError(f"sequence has more image spans than image grids ({len(images)})")
                gt, gh, gw = (int(x) for x in images[n_img])
                sec = 0.0
                n_img += 1
            else:
                if n_vid >= len(videos):
                    raise ValueError(f"sequence has more video spans than video grids ({len(videos)})")
                gt, gh, gw = (int(x) for x in videos[n_vid])
                sec = float(seconds[n_vid])
                n_vid += 1
            lh, lw = gh // m, gw // m
            n = gt * lh * lw
            if t + n > T or np.any(ids[t : t + n] != tok):
                raise ValueError(f"vision span at token {t} is shorter than its grid's {n} tokens")
            tt = np.floor(np.arange(gt, dtype=np.float64) * sec * tokens_per_second).astype(np.int64)
            out[0, t : t + n] = np.repeat(tt, lh * lw) + next_pos
            out[1, t : t + n] = np.tile(np.repeat(np.arange(lh), lw), gt) + next_pos
            out[2, t : t + n] = np.tile(np.arange(lw), gt * lh) + next_pos
            next_pos = int(out[:, t : t + n].max()) + 1
            t += n
        else:
            # A run of text tokens up to the next vision token.
            e = t
            while e < T and ids[e] != image_token_id and ids[e] != video_token_id:
                e += 1
            out[:, t:e] = np.arange(next_pos, next_pos + e - t)
            next_pos += e - t
            t = e
    return out.astype(np.int32)


def compute_positions(config, ids, segment_ids, image_grids, video_grids, second_per_grid_ts) -> np.ndarray:
    """Batched ``[3,B,T]`` positions of ``ids [B,T]``; each segment (``segment_ids`` > 0) is numbered from 0 and
    padding (segment 0) gets 1, as in the reference. Images and videos are consumed in order of appearance, row by
    row; ``second_per_grid_ts`` defaults to 2 fps sampling. ``config`` is an ``InfiniteVLConfig``.
    """
    B, T = ids.shape
    seconds = list(np.asarray(second_per_grid_ts).reshape(-1)) if second_per_grid_ts is not None else \
        [config.vision.temporal_patch_size / 2.0] * len(video_grids)
    pos = np.ones((3, B, T), np.int32)
    i_img = i_vid = 0
    for b in range(B):
        for s in [s for s in np.unique(segment_ids[b]) if s > 0]:
            where = np.nonzero(segment_ids[b] == s)[0]
            toks = ids[b, where]
            n_img = count_spans(toks, config.image_token_id)
            n_vid = count_spans(toks, config.video_token_id)
            pos[:, b, where] = rope_index_1d(
                toks, image_grids[i_img : i_img + n_img], video_grids[i_vid : i_vid + n_vid],
                seconds[i_vid : i_vid + n_vid], image_token_id=config.image_token_id,
                video_token_id=config.video_token_id, spatial_merge_size=config.vision.spatial_merge_size,
                tokens_per_second=config.vision.tokens_per_second,
            )
            i_img, i_vid = i_img + n_img, i_vid + n_vid
    return pos


def count_spans(ids: np.ndarray, token: int) -> int:
    """Number of maximal runs of ``token``. Adjacent spans of one kind must be separated by markers."""
    hit = ids == token
    return int(np.sum(hit[1:] & ~hit[:-1]) + (hit[0] if hit.size else 0))
