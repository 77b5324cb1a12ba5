"""A tiny processor directory for tests and the CPU training demo.

``write_tiny_processor_dir(path, config)`` writes a Hugging Face-style directory (``tokenizer.json``,
``tokenizer_config.json`` with a Qwen2-VL chat template, ``preprocessor_config.json``) whose special tokens get the
ids of ``config`` (e.g. ``tiny_infinitevl()``: special ids at the top of a 1024-token vocabulary). The tokenizer is a
byte-level BPE: the 256 byte symbols, merges spelling out a fixed list of words used by the synthetic data, then the
special tokens, so every string encodes and decodes exactly.
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from infinitevl_jax.config import InfiniteVLConfig
from infinitevl_jax.processing.image import CLIP_MEAN, CLIP_STD
from infinitevl_jax.processing.tokenizer import (
    ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
)

# Words the synthetic data uses most; each becomes one token (with and without a leading space).
WORDS = """
You are a helpful assistant system user What is the colour of shape How many shapes there in this image
picture frame first last video Answer with one word number Which appeared was shown at start red green blue yellow
orange purple white black gray pink brown cyan circle square triangle star cross diamond zero one two three four
five six seven eight nine ten left right top bottom middle and or no yes it an on background large small
""".split()

# A Qwen2-VL style Jinja template (string content with <image>/<video> placeholders, or HF content lists).
TINY_CHAT_TEMPLATE = (
    "{%- set nl = '\\n' -%}{%- set vs = '<|vision_start|>' -%}{%- set ve = '<|vision_end|>' -%}"
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system' ~ nl ~ 'You are a helpful assistant.<|im_end|>' ~ nl }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' ~ m['role'] ~ nl }}"
    "{%- if m['content'] is string -%}"
    "{{ m['content'] | replace('<image>', vs ~ '<|image_pad|>' ~ ve) | replace('<video>', vs ~ '<|video_pad|>' ~ ve) }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ vs ~ '<|image_pad|>' ~ ve }}"
    "{%- elif p['type'] == 'video' -%}{{ vs ~ '<|video_pad|>' ~ ve }}"
    "{%- else -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>' ~ nl }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant' ~ nl }}{%- endif -%}"
)


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte value 0..255 used by byte-level BPE (GPT-2's convention): printable
    Latin-1 bytes map to themselves, the rest to code points from 256 upwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def special_token_ids(config: InfiniteVLConfig) -> dict[str, int]:
    """Special token text -> id from the config (``<|im_start|>`` takes ``eos - 1``, as in Qwen's vocabulary)."""
    ids = {
        ENDOFTEXT: config.bos_token_id, IM_END: config.eos_token_id, VISION_START: config.vision_start_token_id,
        VISION_END: config.vision_end_token_id, "<|vision_pad|>": config.vision_token_id,
        IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id,
    }
    ids[IM_START] = config.eos_token_id - 1
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"special token ids collide: {ids}")
    return ids


def build_tiny_tokenizer(config: InfiniteVLConfig) -> tokenizers.Tokenizer:
    """Byte-level BPE over ``config.text.vocab_size`` ids with the config's special token ids."""
    specials = special_token_ids(config)
    vocab_size = config.text.vocab_size
    base = min(specials.values())
    if base < 256 + 1:
        raise ValueError(f"special ids start at {base}: no room for the 256 byte symbols")
    symbols = _byte_symbols()
    space = symbols[ord(" ")]
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        for spelled in (space + word, word):
            # Merge the word's current BPE pieces left to right so that it always encodes to one token.
            pieces = _apply_merges(list(spelled), ranks)
            while len(pieces) > 1 and len(vocab) < base:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab[pair[0] + pair[1]] = len(vocab)
                pieces = [pair[0] + pair[1], *pieces[2:]]
    # Unused ids below the special tokens (never produced by encoding).
    while len(vocab) < base:
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    by_id = {i: t for t, i in specials.items()}
    for i in range(base, vocab_size):
        tk.add_special_tokens([tokenizers.AddedToken(by_id.get(i, f"<|reserved_{i}|>"), special=True,
                                                     normalized=False)])
    for text, i in specials.items():
        assert tk.token_to_id(text) == i, (text, i, tk.token_to_id(text))
    return tk


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one pre-token: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        best = min(range(len(pieces) - 1), key=lambda i: ranks.get((pieces[i], pieces[i + 1]), 1 << 30))
        if (pieces[best], pieces[best + 1]) not in ranks:
            break
        pieces = [*pieces[:best], pieces[best] + pieces[best + 1], *pieces[best + 2:]]
    return pieces


def write_tiny_processor_dir(path: str | os.PathLike, config: InfiniteVLConfig, *, min_pixels: int = 56 * 56,
                             max_pixels: int = 224 * 224, size_style: str = "legacy", video_fps: float = 2.0,
                             video_max_pixels: int | None = None) -> str:
    """Writes the directory and returns its path. ``size_style``: ``"legacy"`` writes ``min_pixels``/``max_pixels``,
    ``"v5"`` writes ``size.shortest_edge``/``size.longest_edge`` (transformers 5)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    build_tiny_tokenizer(config).save(os.path.join(path, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "Qwen2TokenizerFast", "eos_token": IM_END, "pad_token": ENDOFTEXT, "bos_token": None,
        "model_max_length": 32768, "chat_template": TINY_CHAT_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": config.vision.patch_size,
        "temporal_patch_size": config.vision.temporal_patch_size, "merge_size": config.vision.spatial_merge_size,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "resample": 3,
    }
    if size_style == "legacy":
        pre.update(min_pixels=min_pixels, max_pixels=max_pixels)
    elif size_style == "v5":
        pre["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    else:
        raise ValueError(f"size_style={size_style!r}: expected 'legacy' or 'v5'")
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=1)
    video = {"fps": video_fps, "min_pixels": min_pixels, "max_pixels": video_max_pixels or max_pixels,
             "min_frames": 2, "max_frames": 64}
    with open(os.path.join(path, "video_preprocessor_config.json"), "w") as f:
        json.dump(video, f, indent=1)
    return path
