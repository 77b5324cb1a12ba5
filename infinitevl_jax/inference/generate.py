"""``generate``: chunked prefill, then one compiled decode step per token, at constant memory (teacher aside)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.inference import engine
from infinitevl_jax.inference.cache import Cache, needs_max_length
from infinitevl_jax.modeling.model import prepare_inputs

_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def default_stop_tokens(config) -> tuple[int, ...]:
    """``<|im_end|>`` (eos) and ``<|endoftext|>`` (the release's bos/pad id)."""
    return tuple(sorted({int(config.eos_token_id), int(config.bos_token_id)}))


@dataclasses.dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0
    seed: int = 0


def cache_max_length(config, prompt_length: int, max_new_tokens: int, multiple: int = 256) -> int | None:
    """Slots of the teacher's preallocated KV cache (None when every attention layer is windowed)."""
    if not needs_max_length(config):
        return None
    return -(-(prompt_length + max_new_tokens) // multiple) * multiple


def decode(graphdef, state, cache: Cache, first_logits, *, max_new_tokens: int, sampling: SamplingParams,
           stop_tokens: Sequence[int], on_token: Callable[[int, int], None] | None = None):
    """Samples from ``first_logits [B,V]`` then runs the compiled decode step until every row has emitted a stop
    token or ``max_new_tokens`` tokens. Returns ``(list of 1-D int arrays (stop token included), cache)``."""
    B = first_logits.shape[0]
    greedy = sampling.temperature <= 0.0
    key = jax.random.key(sampling.seed)
    temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
    tok = engine._sample(first_logits, jax.random.fold_in(key, 0), temperature, top_p, top_k=sampling.top_k,
                         greedy=greedy)
    stops = np.asarray(list(stop_tokens), np.int64)
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        t = np.asarray(tok)
        for b in np.flatnonzero(~done):
            out[b].append(int(t[b]))
            if on_token is not None:
                on_token(int(b), int(t[b]))
        done |= np.isin(t, stops)
        if done.all() or i + 1 == max_new_tokens:
            break
        tok, _, cache = engine.decode_step(graphdef, state, cache, tok, jax.random.fold_in(key, i + 1), temperature,
                                           top_p, top_k=sampling.top_k, greedy=greedy)
    return [np.asarray(o, np.int32) for o in out], cache


def generate(model, inputs: Mapping, *, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None, prefill_chunk: int = 512,
             cache_dtype=None, on_token: Callable[[int, int], None] | None = None) -> list[np.ndarray]:
    """Generates a continuation of each prompt of ``inputs``.

    ``model``: an ``InfiniteVLForConditionalGeneration``, or the ``engine.prepare``-d ``InferenceModel`` (what
    ``InfiniteVL`` holds); a plain model is prepared on every call (its decoder blocks copied into per-block arrays,
    held only during the call), so prepare once when generating repeatedly.
    ``inputs``: ``input_ids [T]`` or ``[B,T]`` (left-padded, with ``attention_mask``) plus optionally the processor's
    vision arrays and ``position_ids [3,(B,)T]``. Prefill runs in chunks of ``prefill_chunk`` tokens, then a decode
    step compiled once per (batch, sampling mode). Stops a row at any of ``stop_tokens`` (default ``<|im_end|>``
    and ``<|endoftext|>``). ``on_token(row, token)`` is called as tokens arrive. Returns one array of new tokens per
    row, its stop token included when one was produced.
    """
    model = engine.prepare(model)
    config = model.config
    ids = np.asarray(inputs["input_ids"])
    single = ids.ndim == 1
    kw = {k: inputs[k] for k in _VISION_KEYS if inputs.get(k) is not None and np.asarray(inputs[k]).size}
    mask, pos = inputs.get("attention_mask"), inputs.get("position_ids")
    if single:
        ids = ids[None]
        mask = None if mask is None else np.asarray(mask)[None]
        pos = None if pos is None else np.asarray(pos)[:, None]
    prepared = prepare_inputs(config, ids, attention_mask=mask, position_ids=pos, **kw)
    graphdef, state = model.graphdef, model.state
    vision = {k: prepared[k] for k in ("pixel_values", "image_layout", "pixel_values_videos", "video_layout")
              if k in prepared}
    embeds = engine.embed(graphdef, state, prepared["input_ids"], vision)
    B, T = ids.shape
    cache = engine.new_cache(model, B, max_length=cache_max_length(config, T, max_new_tokens), dtype=cache_dtype)
    logits, cache = engine.prefill(graphdef, state, cache, embeds, prepared["position_ids"], prepared["segment_ids"],
                                   chunk=prefill_chunk)
    tokens, _ = decode(graphdef, state, cache, logits, max_new_tokens=max_new_tokens,
                       sampling=SamplingParams(temperature, top_k, top_p, seed),
                       stop_tokens=default_stop_tokens(config) if stop_tokens is None else stop_tokens,
                       on_token=on_token)
    return tokens
