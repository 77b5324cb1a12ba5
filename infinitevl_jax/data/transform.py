"""Per-record transform: raw sharegpt record -> tokenised example with labels, positions and pixels, or ``Skipped``.

Never raises on a bad record: every failure becomes ``Skipped(source, line, kind, detail)``, counted downstream.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from infinitevl_jax.data.sources import RawRecord
from infinitevl_jax.processing import IGNORE_INDEX, Processor
from infinitevl_jax.processing.chat_template import ConversationError, count_placeholders, normalize_messages
from infinitevl_jax.processing.image import load_image

# Reasons a record is skipped (the ``kind`` of ``Skipped``).
MALFORMED_JSON = "malformed_json"
BAD_RECORD = "bad_record"  # structure: no messages, unknown role, placeholder count vs media list
MISSING_MEDIA = "missing_media"
CORRUPT_MEDIA = "corrupt_media"
PATH_ESCAPE = "path_escapes_media_root"
TOO_LONG = "too_long"  # longer than cutoff_len and the cut would go through (or drop) a vision span
TOO_MANY_PATCHES = "too_much_vision"  # more images/videos/patches than one batch holds
NO_LABELS = "no_labels"
ERROR = "error"  # anything unexpected (reported with the exception)


@dataclasses.dataclass(frozen=True)
class Skipped:
    source: str
    line: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.kind}: {self.detail}"


class _Skip(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class RecordLimits:
    """What one example may hold so that it always fits an empty batch (see ``PackingSpec.record_limits``)."""

    cutoff_len: int
    max_images: int
    max_image_patches: int
    max_videos: int
    max_video_patches: int
    truncate_text: bool = True  # over-long text-only tails are cut; False drops every over-long record


class RecordTransform:
    """Callable mapping a ``RawRecord`` to an example dict (``Processor.encode_conversation`` keys) or ``Skipped``."""

    def __init__(self, processor: Processor, limits: RecordLimits):
        self.processor = processor
        self.limits = limits

    def __call__(self, raw: RawRecord) -> dict[str, np.ndarray] | Skipped:
        try:
            return self._transform(raw)
        except _Skip as s:
            return Skipped(raw.source, raw.line, s.kind, str(s))
        except Exception as e:  # noqa: BLE001 - the pipeline must never die on one record
            return Skipped(raw.source, raw.line, ERROR, repr(e))

    def _transform(self, raw: RawRecord) -> dict[str, np.ndarray]:
        if raw.error is not None:
            raise _Skip(MALFORMED_JSON, raw.error)
        record = raw.record
        if record is None:
            try:
                record = json.loads(raw.text)
            except ValueError as e:
                raise _Skip(MALFORMED_JSON, f"{e}") from None
        if not isinstance(record, Mapping) or not isinstance(record.get("messages", record.get("conversations")), list):
            raise _Skip(BAD_RECORD, "record has no 'messages' list")
        try:
            messages = normalize_messages(record.get("messages", record.get("conversations")))
        except ConversationError as e:
            raise _Skip(BAD_RECORD, str(e)) from None
        images, videos = _as_list(record.get("images")), _as_list(record.get("videos"))
        n_img, n_vid = count_placeholders(messages)
        if n_img != len(images) or n_vid != len(videos):
            raise _Skip(BAD_RECORD, f"{n_img} <image>/{n_vid} <video> placeholders but {len(images)} images/"
                                    f"{len(videos)} videos")
        lim = self.limits
        if len(images) > lim.max_images or len(videos) > lim.max_videos:
            raise _Skip(TOO_MANY_PATCHES, f"{len(images)} images/{len(videos)} videos; a batch holds "
                                          f"{lim.max_images}/{lim.max_videos}")
        loaded_images = [self._open_image(x, raw.media_root) for x in images]
        loaded_videos = [self._open_video(x, raw.media_root) for x in videos]
        fps = record.get("video_fps")
        try:
            media = self.processor.process_media(loaded_images, loaded_videos, fps)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise _Skip(CORRUPT_MEDIA, f"{e}") from None
        if len(media["pixel_values"]) > lim.max_image_patches or len(media["pixel_values_videos"]) > lim.max_video_patches:
            raise _Skip(TOO_MANY_PATCHES, f"{len(media['pixel_values'])} image/{len(media['pixel_values_videos'])} "
                                          f"video patches; a batch holds {lim.max_image_patches}/{lim.max_video_patches}")
        try:
            ex = self.processor.encode_conversation(messages, media=media)
        except (ConversationError, ValueError) as e:
            raise _Skip(BAD_RECORD, str(e)) from None
        ex = self._cut(ex)
        if not np.any(ex["labels"] != IGNORE_INDEX):
            raise _Skip(NO_LABELS, "no assistant tokens to train on")
        return ex

    def _cut(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, cutoff = len(ex["input_ids"]), self.limits.cutoff_len
        if n <= cutoff:
            return ex
        p = self.processor
        tail = ex["input_ids"][cutoff:]
        vision = (p.image_token_id, p.video_token_id, p.vision_start_token_id, p.vision_end_token_id)
        if not self.limits.truncate_text or np.isin(tail, vision).any():
            raise _Skip(TOO_LONG, f"{n} tokens > cutoff_len {cutoff}" +
                        ("" if not self.limits.truncate_text else " and the cut would split or drop a vision span"))
        out = dict(ex)
        out["input_ids"], out["labels"] = ex["input_ids"][:cutoff], ex["labels"][:cutoff]
        out["position_ids"] = ex["position_ids"][:, :cutoff]
        return out

    # ------------------------------------------------------------------------------------------------ media
    def _resolve(self, path: str, root: str | None) -> str:
        if root is None:
            raise _Skip(PATH_ESCAPE, f"media path {path!r} but the source has no media root")
        root_real = os.path.realpath(root)
        full = os.path.realpath(os.path.join(root_real, path))
        if os.path.commonpath([root_real, full]) != root_real:
            raise _Skip(PATH_ESCAPE, f"{path!r} resolves outside the media root {root}")
        if not os.path.exists(full):
            raise _Skip(MISSING_MEDIA, f"{path!r} does not exist under {root}")
        return full

    def _open_image(self, item: Any, root: str | None) -> Image.Image:
        try:
            if isinstance(item, str):
                return _decode_image(self._resolve(item, root))
            if isinstance(item, Mapping) and ("bytes" in item or "path" in item):  # Hugging Face datasets style
                if item.get("bytes") is not None:
                    return _decode_image(io.BytesIO(item["bytes"]))
                return _decode_image(self._resolve(item["path"], root))
            if isinstance(item, (bytes, bytearray)):
                return _decode_image(io.BytesIO(item))
            if isinstance(item, np.ndarray):
                return Image.fromarray(item)
            if isinstance(item, Image.Image):
                return item
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise _Skip(CORRUPT_MEDIA, f"cannot decode image {_describe(item)}: {e}") from None
        raise _Skip(BAD_RECORD, f"unsupported image entry {_describe(item)}")

    def _open_video(self, item: Any, root: str | None):
        """A video file path (decoded by the processor) or a list of frame entries (images)."""
        if isinstance(item, str):
            return self._resolve(item, root)
        if isinstance(item, (list, tuple)):
            return [self._open_image(f, root) for f in item]
        raise _Skip(BAD_RECORD, f"unsupported video entry {_describe(item)}")


def _decode_image(src) -> Image.Image:
    # Decodes fully now (so a truncated or corrupt file fails here), applies EXIF orientation, converts to RGB.
    return load_image(src)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _describe(item: Any) -> str:
    if isinstance(item, str):
        return repr(item)
    return f"<{type(item).__name__}>"
