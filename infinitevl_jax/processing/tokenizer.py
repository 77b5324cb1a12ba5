"""A thin wrapper over a ``tokenizers.Tokenizer`` read from a Hugging Face directory (no transformers needed)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np
import tokenizers

# Qwen2-VL special tokens the processor relies on.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
REQUIRED_SPECIAL_TOKENS = (IM_START, IM_END, ENDOFTEXT, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


class Tokenizer:
    """Encodes text to ``int32`` ids (added tokens such as ``<|im_start|>`` are recognised inside the text) and back."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any] | None = None):
        self._tk = tokenizer
        self.config = dict(config or {})
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eos_token = _token_text(self.config.get("eos_token")) or IM_END
        self.pad_token = _token_text(self.config.get("pad_token")) or ENDOFTEXT

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        tk = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        return cls(tk, config)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    def encode(self, text: str) -> np.ndarray:
        """``[T]`` int32, without any added BOS/EOS (the chat template writes every special token itself)."""
        return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tk


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value
