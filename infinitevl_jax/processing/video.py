"""Video preprocessing: decode with PyAV, sample at ``fps``, resize every frame like an image, group frames in
temporal pairs.

A video of F sampled frames (F made even by repeating the last frame) becomes
``pixel_values_videos [F/2 * grid_h * grid_w, 1176]`` with ``video_grid_thw = (F/2, grid_h, grid_w)`` and
``second_per_grid_t = temporal_patch_size / fps``: the seconds one temporal grid step spans, which M-RoPE scales by
``tokens_per_second``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from infinitevl_jax.processing.image import ImageProcessorConfig, load_image, patchify, resize_and_normalize, smart_resize


@dataclasses.dataclass(frozen=True)
class VideoProcessorConfig:
    """Sampling and per-frame size limits (transformers' ``Qwen2VLVideoProcessor`` defaults)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: "VideoProcessorConfig | None" = None) -> "VideoProcessorConfig":
        base = defaults or cls()
        size = dict(d.get("size") or {})
        return cls(
            fps=float(d.get("fps", base.fps)),
            min_frames=int(d.get("min_frames", base.min_frames)),
            max_frames=int(d.get("max_frames", base.max_frames)),
            min_pixels=int(d.get("min_pixels", size.get("min_pixels", size.get("shortest_edge", base.min_pixels)))),
            max_pixels=int(d.get("max_pixels", size.get("max_pixels", size.get("longest_edge", base.max_pixels)))),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "VideoProcessorConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_indices(num_frames: int, native_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """Indices of the frames to keep: ``fps`` samples per second of video, clamped to [min_frames, max_frames],
    evenly spread over the whole clip (never more frames than it has)."""
    if num_frames <= 0:
        raise ValueError("video has no frames")
    duration = num_frames / native_fps if native_fps > 0 else num_frames / fps
    n = int(round(duration * fps))
    n = max(min(n, max_frames, num_frames), min(min_frames, num_frames), 1)
    return np.unique(np.linspace(0, num_frames - 1, n).round().astype(np.int64))


def decode_video(path: str | os.PathLike, cfg: VideoProcessorConfig = VideoProcessorConfig()
                 ) -> tuple[list[Image.Image], float]:
    """Decodes ``path`` with PyAV and samples frames; returns (frames, the fps the samples are spaced at)."""
    import av  # optional dependency (the ``data`` extra), needed only for video files

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_image() for f in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate
        native_fps = float(rate) if rate else cfg.fps
    if not frames:
        raise ValueError(f"no decodable video frames in {path}")
    keep = sample_indices(len(frames), native_fps, cfg.fps, cfg.min_frames, cfg.max_frames)
    sampled = [frames[i] for i in keep]
    # The spacing actually obtained (fewer samples than asked for when the clip is short or the cap applies).
    duration = len(frames) / native_fps
    eff_fps = len(sampled) / duration if duration > 0 else cfg.fps
    return sampled, eff_fps


def process_frames(frames: Sequence[Image.Image | str | os.PathLike], fps: float, image_cfg: ImageProcessorConfig,
                   video_cfg: VideoProcessorConfig = VideoProcessorConfig()) -> tuple[np.ndarray, np.ndarray, float]:
    """Frames sampled at ``fps`` to ``(pixel_values [gt*gh*gw, patch_dim], grid_thw [3], second_per_grid_t)``.

    All frames are resized to the size smart_resize gives the first one within the video pixel limits.
    """
    if not frames:
        raise ValueError("video has no frames")
    images = [load_image(f) for f in frames]
    tp = image_cfg.temporal_patch_size
    if len(images) % tp:
        images += [images[-1]] * (tp - len(images) % tp)
    w, h = images[0].size
    if h < image_cfg.patch_size or w < image_cfg.patch_size:
        raise ValueError(f"video frames of size {w}x{h} are smaller than one patch")
    rh, rw = smart_resize(h, w, image_cfg.factor, video_cfg.min_pixels, video_cfg.max_pixels)
    stacked = np.stack([resize_and_normalize(im, rh, rw, image_cfg) for im in images])
    pixels, grid = patchify(stacked, image_cfg)
    return pixels, np.asarray(grid, np.int64), tp / float(fps)


def process_video(video: str | os.PathLike | Sequence[Image.Image | str | os.PathLike], image_cfg: ImageProcessorConfig,
                  video_cfg: VideoProcessorConfig = VideoProcessorConfig(), fps: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """A video file (decoded and sampled at ``video_cfg.fps``) or a list of frames already sampled at ``fps``
    (default ``video_cfg.fps``); a list longer than ``max_frames`` is subsampled evenly."""
    if isinstance(video, (str, os.PathLike)):
        frames, eff_fps = decode_video(video, video_cfg)
        return process_frames(frames, eff_fps, image_cfg, video_cfg)
    frames = list(video)
    fps = float(fps or video_cfg.fps)
    if len(frames) > video_cfg.max_frames:
        keep = np.linspace(0, len(frames) - 1, video_cfg.max_frames).round().astype(np.int64)
        fps = fps * video_cfg.max_frames / len(frames)
        frames = [frames[i] for i in keep]
    return process_frames(frames, fps, image_cfg, video_cfg)
