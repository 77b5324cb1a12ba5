"""``Processor``: tokenizer + chat template + image/video preprocessing + M-RoPE positions, all numpy on the host.

Every output is a dict of numpy arrays with the same keys whether or not media are present::

    input_ids            [T] int32      pad tokens expanded: each image/video contributes t*h*w/merge^2 pad tokens
    labels               [T] int32      (conversations only) token ids inside assistant replies, -100 elsewhere
    position_ids         [3, T] int32   M-RoPE (t, h, w) positions, ``infinitevl_jax.positions.rope_index_1d``
    pixel_values         [Ni, 1176] float32, image_grid_thw [n_images, 3] int64
    pixel_values_videos  [Nv, 1176] float32, video_grid_thw [n_videos, 3] int64, second_per_grid_ts [n_videos] float32

Labels are aligned with ``input_ids`` (not shifted): the loss predicts ``labels[t+1]`` from position ``t``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from infinitevl_jax.positions import rope_index_1d
from infinitevl_jax.processing import chat_template
from infinitevl_jax.processing.image import ImageProcessorConfig, load_image, process_image
from infinitevl_jax.processing.tokenizer import (
    IMAGE_PAD, IM_END, IM_START, ENDOFTEXT, VIDEO_PAD, VISION_END, VISION_START, Tokenizer,
)
from infinitevl_jax.processing.video import VideoProcessorConfig, process_video

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class Processor:
    """Turns conversations with images and videos into model inputs (see the module docstring for the layout)."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageProcessorConfig = ImageProcessorConfig(),
                 video_config: VideoProcessorConfig = VideoProcessorConfig(), *, tokens_per_second: float = 2.0,
                 chat_template_text: str | None = None, default_system: str | None = chat_template.DEFAULT_SYSTEM):
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.video_config = video_config
        self.tokens_per_second = float(tokens_per_second)
        # The directory's Jinja template, kept for reference and export; rendering uses ``chat_template`` (Python).
        self.chat_template = chat_template_text
        self.default_system = default_system
        tid = tokenizer.token_to_id
        self.image_token_id = tid(IMAGE_PAD)
        self.video_token_id = tid(VIDEO_PAD)
        self.vision_start_token_id = tid(VISION_START)
        self.vision_end_token_id = tid(VISION_END)
        self.im_start_token_id = tid(IM_START)
        self.im_end_token_id = tid(IM_END)
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        # Generation stops at <|im_end|> and at <|endoftext|>.
        self.stop_token_ids = tuple(sorted({self.im_end_token_id, tid(ENDOFTEXT)}))

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Processor":
        """Reads ``tokenizer.json``, ``tokenizer_config.json``, the chat template (``chat_template.jinja``,
        ``chat_template.json`` or ``tokenizer_config.json``), ``preprocessor_config.json`` (older ``min_pixels``/
        ``max_pixels`` or transformers-5 ``size``), optional ``video_preprocessor_config.json`` and
        ``config.json``'s ``vision_config.tokens_per_second``. Keyword overrides: ``min_pixels``, ``max_pixels``,
        ``video_fps``, ``video_max_frames``, ``video_min_pixels``, ``video_max_pixels``, ``default_system``."""
        path = os.fspath(path)
        tokenizer = Tokenizer.from_pretrained(path)
        pre = _read_json(os.path.join(path, "preprocessor_config.json")) or {}
        image_cfg = ImageProcessorConfig.from_dict(pre)
        video_raw = _read_json(os.path.join(path, "video_preprocessor_config.json"))
        video_cfg = VideoProcessorConfig.from_dict(video_raw or {})
        config = _read_json(os.path.join(path, "config.json")) or {}
        tps = (config.get("vision_config") or {}).get("tokens_per_second", 2.0)
        template = _read_chat_template(path, tokenizer.config)

        image_changes = {k: overrides.pop(k) for k in ("min_pixels", "max_pixels") if k in overrides}
        if image_changes:
            image_cfg = ImageProcessorConfig.from_dict({**image_cfg.to_dict(), **image_changes})
        video_changes = {k[len("video_"):]: overrides.pop(k) for k in list(overrides) if k.startswith("video_")}
        if video_changes:
            video_cfg = VideoProcessorConfig.from_dict({**video_cfg.to_dict(), **video_changes})
        default_system = overrides.pop("default_system", chat_template.DEFAULT_SYSTEM)
        if overrides:
            raise TypeError(f"unknown Processor options {sorted(overrides)}")
        return cls(tokenizer, image_cfg, video_cfg, tokens_per_second=tps, chat_template_text=template,
                   default_system=default_system)

    # ------------------------------------------------------------------------------------------------ text
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The rendered conversation (one pad token per image/video, before expansion)."""
        return chat_template.render(messages, add_generation_prompt, self.default_system)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=skip_special_tokens)

    def num_vision_tokens(self, grid_thw) -> int:
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.image_config.merge_size**2

    # ------------------------------------------------------------------------------------------------ media
    def process_image(self, image: Image.Image | str | os.PathLike) -> dict[str, np.ndarray]:
        """One image: ``pixel_values [gh*gw, 1176]``, ``image_grid_thw [1, 3]``."""
        pixels, grid = process_image(load_image(image), self.image_config)
        return {"pixel_values": pixels, "image_grid_thw": grid[None]}

    def process_video(self, video, fps: float | None = None) -> dict[str, np.ndarray]:
        """A video file (sampled at ``video_config.fps``) or a list of frames sampled at ``fps``:
        ``pixel_values_videos [gt*gh*gw, 1176]``, ``video_grid_thw [1, 3]``, ``second_per_grid_ts [1]``."""
        pixels, grid, spg = process_video(video, self.image_config, self.video_config, fps)
        return {"pixel_values_videos": pixels, "video_grid_thw": grid[None],
                "second_per_grid_ts": np.asarray([spg], np.float32)}

    def process_media(self, images: Sequence = (), videos: Sequence = (), video_fps=None) -> dict[str, np.ndarray]:
        """All images and videos of one sample, concatenated in order (empty arrays when there are none)."""
        dim = self.image_config.patch_dim
        ims = [self.process_image(im) for im in images]
        fps = video_fps if isinstance(video_fps, (list, tuple)) else [video_fps] * len(videos)
        vids = [self.process_video(v, f) for v, f in zip(videos, fps)]
        return {
            "pixel_values": _cat([d["pixel_values"] for d in ims], (0, dim), np.float32),
            "image_grid_thw": _cat([d["image_grid_thw"] for d in ims], (0, 3), np.int64),
            "pixel_values_videos": _cat([d["pixel_values_videos"] for d in vids], (0, dim), np.float32),
            "video_grid_thw": _cat([d["video_grid_thw"] for d in vids], (0, 3), np.int64),
            "second_per_grid_ts": _cat([d["second_per_grid_ts"] for d in vids], (0,), np.float32),
        }

    # ------------------------------------------------------------------------------------------------ full samples
    def __call__(self, text: str, images: Sequence = (), videos: Sequence = (), video_fps=None) -> dict[str, np.ndarray]:
        """Already-rendered ``text`` (one pad per image/video, e.g. from ``apply_chat_template``) plus its media."""
        media = self.process_media(images, videos, video_fps)
        ids = self.expand_vision_tokens(self.tokenizer.encode(text), media["image_grid_thw"], media["video_grid_thw"])
        return {"input_ids": ids, **media, "position_ids": self.position_ids(ids, media)}

    def encode_conversation(self, messages: Sequence[Mapping[str, Any]], images: Sequence = (), videos: Sequence = (),
                            *, add_generation_prompt: bool = False, video_fps=None,
                            media: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A conversation with ``<image>``/``<video>`` placeholders: inputs, positions and LLaMA-Factory labels.

        ``media`` (the output of ``process_media``) may be passed instead of ``images``/``videos``.
        """
        msgs = chat_template.normalize_messages(messages)
        n_img, n_vid = chat_template.count_placeholders(msgs)
        if media is None:
            if n_img != len(images) or n_vid != len(videos):
                raise ValueError(f"conversation has {n_img} <image> and {n_vid} <video> placeholders but "
                                 f"{len(images)} images and {len(videos)} videos were given")
            media = self.process_media(images, videos, video_fps)
        elif n_img != len(media["image_grid_thw"]) or n_vid != len(media["video_grid_thw"]):
            raise ValueError("placeholder counts do not match the processed media")
        segments = chat_template.render_segments(msgs, add_generation_prompt, self.default_system)
        pieces = self.tokenizer.encode_batch([t for t, _ in segments])
        ids = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
        labels = np.concatenate([p if lab else np.full_like(p, IGNORE_INDEX) for p, (_, lab) in zip(pieces, segments)]
                                ) if pieces else np.zeros((0,), np.int32)
        ids, labels = self.expand_vision_tokens(ids, media["image_grid_thw"], media["video_grid_thw"], labels)
        return {"input_ids": ids, "labels": labels, **media, "position_ids": self.position_ids(ids, media)}

    def expand_vision_tokens(self, ids: np.ndarray, image_grid_thw, video_grid_thw, labels: np.ndarray | None = None):
        """Repeats the k-th image (video) pad token to the k-th grid's token count. Returns ids (and labels)."""
        ids = np.asarray(ids, np.int32)
        img_at = np.flatnonzero(ids == self.image_token_id)
        vid_at = np.flatnonzero(ids == self.video_token_id)
        if len(img_at) != len(image_grid_thw) or len(vid_at) != len(video_grid_thw):
            raise ValueError(f"text has {len(img_at)} image and {len(vid_at)} video pad tokens but "
                             f"{len(image_grid_thw)} image and {len(video_grid_thw)} video grids were given")
        reps = np.ones(ids.shape, np.int64)
        reps[img_at] = [self.num_vision_tokens(g) for g in image_grid_thw]
        reps[vid_at] = [self.num_vision_tokens(g) for g in video_grid_thw]
        out = np.repeat(ids, reps)
        if labels is None:
            return out
        return out, np.repeat(np.asarray(labels, np.int32), reps)

    def position_ids(self, ids: np.ndarray, media: Mapping[str, np.ndarray], start: int = 0) -> np.ndarray:
        return rope_index_1d(
            ids, media.get("image_grid_thw", ()), media.get("video_grid_thw", ()), media.get("second_per_grid_ts"),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.image_config.merge_size, tokens_per_second=self.tokens_per_second, start=start,
        )


def _cat(arrays, empty_shape, dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(empty_shape, dtype)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _read_chat_template(path: str, tokenizer_config: Mapping[str, Any]) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    raw = _read_json(os.path.join(path, "chat_template.json"))
    if raw and raw.get("chat_template"):
        return raw["chat_template"]
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
