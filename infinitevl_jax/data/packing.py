"""Packing examples into fixed-shape batches (pure numpy; the grain wrapper lives in ``pipeline.py``).

A batch has static shapes so the jitted train step compiles once per patch bucket:

    input_ids, labels, segment_ids, attention_mask   [B, S] int32   labels -100 outside assistant replies and on padding
    position_ids                                      [3, B, S] int32 M-RoPE, restarting at 0 in every document
    pixel_values          [P_img, 1176] float32   P_img = the smallest of ``image_patch_buckets`` >= patches used
    image_grid_thw        [max_images, 3] int32   real grids first, zero rows after
    pixel_values_videos   [P_vid, 1176] float32   P_vid from ``video_patch_buckets``
    video_grid_thw        [max_videos, 3] int32, second_per_grid_ts [max_videos] float32
    num_images, num_videos  [] int32

``segment_ids`` numbers the documents of each row from 1 (0 = padding). Images (videos) are ordered as their pad
tokens appear in ``input_ids`` flattened row-major, so the model fills the k-th run of image pad tokens with the k-th
image's merged features, exactly as Hugging Face does for one unpacked batch. Padding rows of ``pixel_values`` are 0.

Examples are placed first-fit over the rows of the batch being built; a batch is emitted as soon as an example fits
in no row or would overflow the vision budget (images, videos, largest patch bucket); that example opens the next.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from infinitevl_jax.processing import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    batch_size: int
    seq_len: int
    max_images: int
    image_patch_buckets: tuple[int, ...]
    max_videos: int
    video_patch_buckets: tuple[int, ...]
    patch_dim: int = 1176

    def __post_init__(self):
        for name in ("image_patch_buckets", "video_patch_buckets"):
            b = tuple(sorted(int(x) for x in getattr(self, name)))
            if not b or b[0] < 0:
                raise ValueError(f"{name} must list at least one size >= 0, got {b}")
            object.__setattr__(self, name, b)

    @classmethod
    def default(cls, batch_size: int, seq_len: int, *, max_images: int | None = None,
                image_patch_buckets: Sequence[int] | None = None, max_videos: int | None = None,
                video_patch_buckets: Sequence[int] | None = None, merge_unit: int = 4,
                patch_dim: int = 1176) -> "PackingSpec":
        """Budgets that can never be the binding limit for text: each merged vision token takes one text position,
        so a batch holds at most ``merge_unit * B * S`` patches. Buckets are 1/8, 1/4, 1/2 and all of it (images);
        videos get the same top with buckets at 0, 1/4 and all (batches without video pay nothing).
        ``max_images``/``max_videos`` default to ``max(8, B * S // 256)`` grids."""
        top = merge_unit * batch_size * seq_len
        grids = max(8, batch_size * seq_len // 256)
        return cls(
            batch_size=batch_size, seq_len=seq_len,
            max_images=grids if max_images is None else max_images,
            image_patch_buckets=tuple(image_patch_buckets or (top // 8, top // 4, top // 2, top)),
            max_videos=grids if max_videos is None else max_videos,
            video_patch_buckets=tuple(video_patch_buckets or (0, top // 4, top)),
            patch_dim=patch_dim,
        )

    @property
    def max_image_patches(self) -> int:
        return self.image_patch_buckets[-1]

    @property
    def max_video_patches(self) -> int:
        return self.video_patch_buckets[-1]


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} patches exceed the largest bucket {buckets[-1]}")


class Packer:
    """Accumulates examples (``Processor.encode_conversation`` dicts) for one batch."""

    def __init__(self, spec: PackingSpec):
        self.spec = spec
        self.rows: list[list[dict]] = [[] for _ in range(spec.batch_size)]
        self.row_len = [0] * spec.batch_size
        self.n_images = self.n_videos = self.image_patches = self.video_patches = 0
        self.count = 0

    def try_add(self, ex: dict) -> bool:
        """Places ``ex`` in the first row with room, if the batch's vision budget allows; False if it does not fit."""
        s = self.spec
        n = len(ex["input_ids"])
        if n > s.seq_len:
            raise ValueError(f"example of {n} tokens exceeds seq_len {s.seq_len} (cutoff_len must be <= seq_len)")
        ni, nv = len(ex["image_grid_thw"]), len(ex["video_grid_thw"])
        pi, pv = len(ex["pixel_values"]), len(ex["pixel_values_videos"])
        if (self.n_images + ni > s.max_images or self.n_videos + nv > s.max_videos
                or self.image_patches + pi > s.max_image_patches or self.video_patches + pv > s.max_video_patches):
            return False
        for b in range(s.batch_size):
            if self.row_len[b] + n <= s.seq_len:
                self.rows[b].append(ex)
                self.row_len[b] += n
                self.n_images, self.n_videos = self.n_images + ni, self.n_videos + nv
                self.image_patches, self.video_patches = self.image_patches + pi, self.video_patches + pv
                self.count += 1
                return True
        return False

    def finish(self) -> dict[str, np.ndarray]:
        s = self.spec
        B, S = s.batch_size, s.seq_len
        input_ids = np.zeros((B, S), np.int32)
        labels = np.full((B, S), IGNORE_INDEX, np.int32)
        segment_ids = np.zeros((B, S), np.int32)
        positions = np.zeros((3, B, S), np.int32)
        pixel_values = np.zeros((_bucket(self.image_patches, s.image_patch_buckets), s.patch_dim), np.float32)
        pixel_values_videos = np.zeros((_bucket(self.video_patches, s.video_patch_buckets), s.patch_dim), np.float32)
        image_grid = np.zeros((s.max_images, 3), np.int32)
        video_grid = np.zeros((s.max_videos, 3), np.int32)
        seconds = np.zeros((s.max_videos,), np.float32)
        ni = nv = pi = pv = 0
        for b, row in enumerate(self.rows):
            t = 0
            for seg, ex in enumerate(row, start=1):
                n = len(ex["input_ids"])
                input_ids[b, t:t + n] = ex["input_ids"]
                labels[b, t:t + n] = ex["labels"]
                segment_ids[b, t:t + n] = seg
                positions[:, b, t:t + n] = ex["position_ids"]
                t += n
                k = len(ex["image_grid_thw"])
                image_grid[ni:ni + k] = ex["image_grid_thw"]
                ni += k
                m = len(ex["pixel_values"])
                pixel_values[pi:pi + m] = ex["pixel_values"]
                pi += m
                k = len(ex["video_grid_thw"])
                video_grid[nv:nv + k] = ex["video_grid_thw"]
                seconds[nv:nv + k] = ex["second_per_grid_ts"]
                nv += k
                m = len(ex["pixel_values_videos"])
                pixel_values_videos[pv:pv + m] = ex["pixel_values_videos"]
                pv += m
        return {
            "input_ids": input_ids, "labels": labels, "segment_ids": segment_ids,
            "attention_mask": (segment_ids > 0).astype(np.int32), "position_ids": positions,
            "pixel_values": pixel_values, "image_grid_thw": image_grid, "num_images": np.int32(ni),
            "pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid, "second_per_grid_ts": seconds,
            "num_videos": np.int32(nv),
        }


def pack(examples: Sequence[dict], spec: PackingSpec) -> list[dict[str, np.ndarray]]:
    """Packs a finite list in order (the same policy as the streaming packer); for tests and offline use."""
    out, packer = [], Packer(spec)
    for ex in examples:
        if not packer.try_add(ex):
            out.append(packer.finish())
            packer = Packer(spec)
            if not packer.try_add(ex):
                raise ValueError("example does not fit an empty batch")
    if packer.count:
        out.append(packer.finish())
    return out
