"""Qwen2.5-VL image preprocessing: PIL in, ``pixel_values [grid_t*grid_h*grid_w, 1176]`` out.

Matches transformers' ``Qwen2VLImageProcessorPil``: RGB conversion (transparency composited on white), bicubic
resize by PIL to multiples of ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``, rescale by 1/255,
CLIP mean/std, repetition to ``temporal_patch_size`` frames, then flattening in the vision tower's patch order
(each ``merge_size x merge_size`` group of neighbouring patches is contiguous, so the merger can reshape rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """What ``preprocessor_config.json`` says about images (both the pre-5 and the transformers-5 layouts)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (28): one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: "ImageProcessorConfig | None" = None) -> "ImageProcessorConfig":
        """Reads a parsed ``preprocessor_config.json``: ``min_pixels``/``max_pixels`` (older files, also under ``size``)
        take precedence over ``size.shortest_edge``/``size.longest_edge`` (transformers 5), as in transformers."""
        base = defaults or cls()
        size = dict(d.get("size") or {})
        min_pixels = d.get("min_pixels", size.get("min_pixels", size.get("shortest_edge", base.min_pixels)))
        max_pixels = d.get("max_pixels", size.get("max_pixels", size.get("longest_edge", base.max_pixels)))
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(d.get("patch_size", base.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
            merge_size=int(d.get("merge_size", base.merge_size)),
            image_mean=tuple(float(x) for x in d.get("image_mean", base.image_mean)),
            image_std=tuple(float(x) for x in d.get("image_std", base.image_std)),
            rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            resample=int(d.get("resample", base.resample)),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect ratio kept.

    Sides are first rounded to the nearest multiple; if the area is then too large both sides shrink by the same
    ratio and round down, if too small they grow and round up.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of size {width}x{height} is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds {MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path_or_image: str | os.PathLike | Image.Image) -> Image.Image:
    """Opens (fully decoding, so corrupt files fail here) and applies EXIF orientation; returns RGB."""
    if isinstance(path_or_image, Image.Image):
        image = ImageOps.exif_transpose(path_or_image)
    else:
        with Image.open(path_or_image) as f:
            f.load()
            image = ImageOps.exif_transpose(f)  # a copy, so the file can close
    return to_rgb(image)


def resize_and_normalize(image: Image.Image, height: int, width: int, cfg: ImageProcessorConfig) -> np.ndarray:
    """``[3, height, width]`` float32: PIL resize of the uint8 image, then rescale and CLIP normalisation."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=cfg.resample)
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    # Rescale in float64 then cast, then normalise in float32: the order transformers uses (bit-for-bit close).
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, np.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``frames [F, 3, H, W]`` (F a multiple of temporal_patch_size) to ``[grid_t*grid_h*grid_w, patch_dim]``.

    Row order is (t, h_block, w_block, h_in_block, w_in_block): each merge group of m x m patches is contiguous.
    Column order is (channel, temporal, patch_row, patch_col), the flattening of the Conv3d patch embedding kernel.
    """
    F, C, H, W = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if F % tp or H % (p * m) or W % (p * m):
        raise ValueError(f"frames {frames.shape} are not multiples of temporal {tp} / spatial {p * m}")
    gt, gh, gw = F // tp, H // p, W // p
    x = frames.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, C * tp * p * p), (gt, gh, gw)


def process_image(image: Image.Image, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One image to ``(pixel_values [gh*gw, patch_dim] float32, grid_thw [3] int64 = (1, gh, gw))``."""
    image = to_rgb(image)
    w, h = image.size
    if h < cfg.patch_size or w < cfg.patch_size:
        raise ValueError(f"image of size {w}x{h} is smaller than one {cfg.patch_size}x{cfg.patch_size} patch")
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    x = resize_and_normalize(image, rh, rw, cfg)
    frames = np.broadcast_to(x[None], (cfg.temporal_patch_size, *x.shape))
    pixels, grid = patchify(frames, cfg)
    return pixels, np.asarray(grid, dtype=np.int64)


def process_images(images: Sequence[Image.Image], cfg: ImageProcessorConfig = ImageProcessorConfig()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Several images: rows concatenated in order, ``grid_thw [n, 3]``."""
    if not images:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    out = [process_image(im, cfg) for im in images]
    return np.concatenate([o[0] for o in out]), np.stack([o[1] for o in out])
