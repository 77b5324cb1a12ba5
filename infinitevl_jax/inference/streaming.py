"""Streaming video: frames are prefilled into the cache as they come (one at a time, or ``frames_per_step`` per
compiled program), at constant memory; questions are answered from a copy of the state (REFERENCE section 8).

The stream is one open vision span: the header (system prompt, ``<|im_start|>user\\n<|vision_start|>``) is prefilled
once, then every frame is encoded as an image (repeated to the temporal patch) and its tokens get M-RoPE positions
``(base + t, base + h, base + w)``: only the temporal component advances, by ``tokens_per_second`` per second of
video. A question closes the span on a copy of the cache (``<|vision_end|>`` then the text, resuming one past the
span's largest position) and generates; the stream itself is untouched and can take more frames.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.inference import engine
from infinitevl_jax.inference.cache import Cache, needs_max_length
from infinitevl_jax.inference.generate import SamplingParams, decode
from infinitevl_jax.modeling.vision import vision_layout
from infinitevl_jax.positions import rope_index_1d


def frame_position_ids(grid_thw, base: int, t_index: int, spatial_merge_size: int) -> np.ndarray:
    """``[3, gh*gw/m^2]`` positions of one streamed frame's tokens (raster order over the merged grid)."""
    _, h, w = (int(x) for x in grid_thw)
    gh, gw = h // spatial_merge_size, w // spatial_merge_size
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([np.full(gh * gw, t_index), hh.ravel(), ww.ravel()]).astype(np.int32) + base


class StreamingSession:
    """``add_frames(frames)`` then ``ask(question)`` any number of times, in any order.

    ``model``: an ``InfiniteVLForConditionalGeneration`` or an ``engine.prepare``-d ``InferenceModel``; the session
    keeps only the prepared form (per-block decoder weights), not a plain model's stacked blocks.
    ``frames_per_step``: how many frames (consecutive ones of one ``add_frames`` call, same size) are prefilled by one
    compiled program: the vision tower on each, the language model on their tokens as one chunk. The result equals
    frame-by-frame streaming; frames that do not fill a group go one at a time. Programs compiled per frame size:
    the group's and the single frame's.
    ``max_length`` is needed only for a model with full-attention layers (the teacher), whose cache grows.
    ``record=True`` keeps every token id, position and pixel array on the host (tests; memory grows).
    """

    def __init__(self, model, processor, *, fps: float = 2.0, system: str | None = None, max_length: int | None = None,
                 cache_dtype=None, prefill_chunk: int = 512, frames_per_step: int = 1, record: bool = False):
        if int(frames_per_step) < 1:
            raise ValueError(f"frames_per_step must be >= 1, got {frames_per_step}")
        self.model = engine.prepare(model)
        self.processor = processor
        self.config = self.model.config
        self.fps = float(fps)
        self.prefill_chunk = prefill_chunk
        self.frames_per_step = int(frames_per_step)
        self.graphdef, self.state = self.model.graphdef, self.model.state
        if needs_max_length(self.config) and max_length is None:
            raise ValueError("a model with full-attention layers needs max_length for its KV cache")
        self.cache: Cache = engine.new_cache(self.model, 1, max_length=max_length, dtype=cache_dtype)
        self.record = record
        self.history = {"input_ids": [], "position_ids": [], "pixel_values": [], "image_grid_thw": []}
        self.num_frames = 0
        self._layouts: dict[tuple, object] = {}
        sys_text = processor.default_system if system is None else system
        header = (f"<|im_start|>system\n{sys_text}<|im_end|>\n" if sys_text else "") + \
            "<|im_start|>user\n<|vision_start|>"
        ids = np.asarray(processor.tokenizer.encode(header), np.int32)
        self._prefill_text(ids)
        self.base = int(self.cache.next_position[0])  # position of the span's origin
        self.span_max = -1  # largest position offset inside the span so far

    # ------------------------------------------------------------------ state
    def _prefill_text(self, ids: np.ndarray, cache: Cache | None = None, start: int = 0):
        pos = rope_index_1d(ids, image_token_id=-1, video_token_id=-1, start=start)[:, None]
        own = cache is None
        cache = self.cache if own else cache
        embeds = engine.embed(self.graphdef, self.state, jnp.asarray(ids[None]), {})
        logits, cache = engine.prefill(self.graphdef, self.state, cache, embeds, pos, np.ones((1, len(ids)), np.int32),
                                       chunk=self.prefill_chunk)
        if self.record and own:
            self.history["input_ids"].append(ids)
            self.history["position_ids"].append(pos[:, 0])
        if own:
            self.cache = cache
        return logits, cache

    @property
    def resume_position(self) -> int:
        """Where text after the span starts: one past the span's largest position."""
        return self.base + self.span_max + 1

    # ------------------------------------------------------------------ frames
    def add_frames(self, frames: Sequence, timestamps: Sequence[float] | None = None):
        """Prefills each frame (a PIL image, an image path or an ``[H,W,3]`` uint8 array) in order, in groups of
        ``frames_per_step``. Frame ``i`` of the stream sits at ``timestamps[i]`` seconds (default ``i / fps``).
        Returns the last frame's logits."""
        logits = None
        start = self.num_frames
        group: list = []  # consecutive processed frames of one grid: (pixel_values, grid, timestamp)
        for j, frame in enumerate(frames):
            ts = ((start + j) / self.fps) if timestamps is None else float(timestamps[j])
            media = self.processor.process_image(_as_image(frame))
            grid = tuple(int(x) for x in np.asarray(media["image_grid_thw"]).reshape(-1))
            if group and grid != group[0][1]:
                logits = self._add_singly(group)
                group = []
            group.append((media["pixel_values"], grid, ts))
            if len(group) == self.frames_per_step:
                logits = self._add_singly(group) if len(group) == 1 else self._add_group(group)
                group = []
        if group:
            logits = self._add_singly(group)
        return logits

    def _add_singly(self, group):
        logits = None
        for pixels, grid, ts in group:
            logits = self.add_pixels(pixels, np.asarray(grid), timestamp=ts)
        return logits

    def _layout(self, grid: tuple):
        layout = self._layouts.get(grid)
        if layout is None:
            layout = self._layouts[grid] = vision_layout(np.asarray([grid]), self.config.vision)
        return layout

    def _frame_positions(self, grid: tuple, timestamp: float) -> np.ndarray:
        vc = self.config.vision
        return frame_position_ids(grid, self.base, int(timestamp * vc.tokens_per_second), vc.spatial_merge_size)

    def _record_frame(self, ids, pos, pixel_values, grid):
        self.span_max = max(self.span_max, int(pos.max()) - self.base)
        self.num_frames += 1
        if self.record:
            self.history["input_ids"].append(ids)
            self.history["position_ids"].append(pos)
            self.history["pixel_values"].append(np.asarray(pixel_values))
            self.history["image_grid_thw"].append(np.asarray(grid)[None])

    def add_pixels(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray, *, timestamp: float):
        """One already-processed frame (``Processor.process_image``'s output)."""
        grid = tuple(int(x) for x in np.asarray(image_grid_thw).reshape(-1))
        layout = self._layout(grid)
        pos = self._frame_positions(grid, timestamp)
        n = pos.shape[1]
        ids = np.full((1, n), self.config.image_token_id, np.int32)
        logits, self.cache = engine.embed_prefill_step(
            self.graphdef, self.state, self.cache, ids, {"pixel_values": jnp.asarray(pixel_values),
                                                           "image_layout": layout},
            pos[:, None], np.ones((1, n), np.int32))
        self._record_frame(ids[0], pos, pixel_values, grid)
        return logits

    def add_pixel_group(self, pixel_values: Sequence[np.ndarray], image_grid_thw, timestamps: Sequence[float]):
        """Already-processed frames of one grid (``image_grid_thw``, one row) prefilled by one program."""
        grid = tuple(int(x) for x in np.asarray(image_grid_thw).reshape(-1))
        return self._add_group([(p, grid, float(t)) for p, t in zip(pixel_values, timestamps)])

    def _add_group(self, group):
        grid = group[0][1]
        pos = [self._frame_positions(grid, ts) for _, _, ts in group]
        pixels = np.stack([np.asarray(p) for p, _, _ in group])
        logits, self.cache = engine.frames_prefill_step(self.graphdef, self.state, self.cache, jnp.asarray(pixels),
                                                        self._layout(grid), np.concatenate(pos, axis=1)[:, None])
        for (p, _, _), fp in zip(group, pos):
            self._record_frame(np.full(fp.shape[1], self.config.image_token_id, np.int32), fp, p, grid)
        return logits

    # ------------------------------------------------------------------ questions
    def question_ids(self, question: str) -> np.ndarray:
        text = f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        return np.asarray(self.processor.tokenizer.encode(text), np.int32)

    def ask(self, question: str, *, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int = 0, on_token: Callable[[int, int], None] | None = None,
            return_ids: bool = False):
        """Answers ``question`` about everything streamed so far, from a copy of the state (the stream is left
        bit-identical). Returns the decoded answer (or its token ids)."""
        ids = self.question_ids(question)
        logits, cache = self._prefill_text(ids, cache=self.cache.copy(), start=self.resume_position)
        tokens, _ = decode(self.graphdef, self.state, cache, logits, max_new_tokens=max_new_tokens,
                           sampling=SamplingParams(temperature, top_k, top_p, seed),
                           stop_tokens=self.processor.stop_token_ids,
                           on_token=None if on_token is None else (lambda b, t: on_token(t)))
        toks = tokens[0]
        if return_ids:
            return toks
        return self.processor.decode(toks[np.isin(toks, self.processor.stop_token_ids, invert=True)])

    def recorded_inputs(self, question: str | None = None) -> dict:
        """The whole stream (and optionally a question) as one prompt for ``generate`` (needs ``record=True``)."""
        h = self.history
        ids, pos = list(h["input_ids"]), list(h["position_ids"])
        if question is not None:
            q = self.question_ids(question)
            ids.append(q)
            pos.append(rope_index_1d(q, image_token_id=-1, video_token_id=-1, start=self.resume_position))
        out = {"input_ids": np.concatenate(ids), "position_ids": np.concatenate(pos, axis=1)}
        if h["pixel_values"]:
            out["pixel_values"] = np.concatenate(h["pixel_values"])
            out["image_grid_thw"] = np.concatenate(h["image_grid_thw"])
        return out


def _as_image(frame):
    if isinstance(frame, np.ndarray):
        from PIL import Image

        return Image.fromarray(frame)
    return frame
