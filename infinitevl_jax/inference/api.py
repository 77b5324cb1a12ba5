"""``InfiniteVL``: a loaded model and its processor, with chat and streaming helpers."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from infinitevl_jax.inference import engine
from infinitevl_jax.inference.generate import generate
from infinitevl_jax.inference.streaming import StreamingSession


class InfiniteVL:
    """``model``: an ``InfiniteVLForConditionalGeneration`` (prepared here: its decoder blocks are copied into per-block
    arrays, the stacked ones are not kept) or an ``engine.InferenceModel``; ``self.model`` is the prepared one."""

    def __init__(self, model, processor):
        self.model, self.processor = engine.prepare(model), processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype=None, mesh=None, **processor_options) -> "InfiniteVL":
        """A converted checkpoint directory (``infinitevl convert``) holding the tokenizer/processor files too. The
        restored model is converted in place (``consume=True``): memory holds the weights once."""
        from infinitevl_jax import checkpoint
        from infinitevl_jax.processing import Processor

        model = engine.prepare(checkpoint.load(path, mesh, dtype=dtype), consume=True)
        return cls(model, Processor.from_pretrained(path, **processor_options))

    def encode(self, prompt: str, images: Sequence = (), videos: Sequence = (), video_fps=None) -> dict:
        """One user turn (images, then videos, then the text) with the generation prompt appended."""
        content = "<image>" * len(images) + "<video>" * len(videos) + prompt
        return self.processor.encode_conversation([{"role": "user", "content": content}], images, videos,
                                                  add_generation_prompt=True, video_fps=video_fps)

    def chat(self, prompt: str, images: Sequence = (), videos: Sequence = (), *, video_fps=None,
             on_text: Callable[[str], None] | None = None, **generate_kwargs) -> str:
        """Answers ``prompt`` about ``images``/``videos``; ``on_text`` receives the answer as it grows (new text
        only). ``generate_kwargs``: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``."""
        inputs = self.encode(prompt, images, videos, video_fps)
        inputs.pop("labels", None)
        printer = TextStreamer(self.processor, on_text) if on_text else None
        tokens = generate(self.model, inputs, stop_tokens=self.processor.stop_token_ids,
                          on_token=printer and (lambda b, t: printer(t)), **generate_kwargs)[0]
        return self.processor.decode(strip_stop(tokens, self.processor.stop_token_ids))

    def stream(self, **session_kwargs) -> StreamingSession:
        return StreamingSession(self.model, self.processor, **session_kwargs)


def strip_stop(tokens: np.ndarray, stop: Sequence[int]) -> np.ndarray:
    return tokens[np.isin(tokens, list(stop), invert=True)]


class TextStreamer:
    """Turns a token stream into text increments (decoding the whole answer each time keeps multi-byte characters
    that span tokens intact)."""

    def __init__(self, processor, emit: Callable[[str], None]):
        self.processor, self.emit = processor, emit
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, token: int) -> None:
        if token in self.processor.stop_token_ids:
            return
        self.tokens.append(token)
        text = self.processor.decode(self.tokens)
        if not text.endswith("\ufffd") and len(text) > len(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text
