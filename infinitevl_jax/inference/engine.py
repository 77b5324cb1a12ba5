"""Jitted prefill and decode over a ``Cache``: the pieces ``generate`` and ``StreamingSession`` are made of.

Shapes are bucketed so that a session compiles a handful of programs: prefill chunks have ``chunk`` tokens (a prompt
shorter than one chunk is left-padded to a power of two >= 16), the decode step always has one token per row, and the
cache is donated to every step so its buffers are reused in place (memory stays flat however long the stream).

Sequence indices (``q_positions``, what the SWA ring buffer and the causal masks use) count the real tokens of a
row; M-RoPE positions (``position_ids``) are separate and follow the release's rule. Batches are left-padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.inference.cache import Cache

MIN_BUCKET = 16


def bucket_length(n: int, chunk: int) -> int:
    """Padded prompt length: a power of two >= 16 up to ``chunk``, then a multiple of ``chunk``."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), chunk)


def _advance(model, cache: Cache, embeds, positions, segment_ids):
    """One cached forward of ``embeds [B,T,E]``; returns final hidden states and the advanced cache."""
    live = segment_ids > 0
    q_pos = jnp.where(live, cache.length[:, None] + jnp.cumsum(live, axis=1, dtype=jnp.int32) - 1, -1)
    h, layers = model.step(embeds, position_ids=positions, segment_ids=segment_ids, q_positions=q_pos,
                           caches=cache.layers)
    seen = jnp.max(jnp.where(live[None], positions, -1), axis=(0, 2)) + 1
    cache = Cache(layers, cache.length + jnp.sum(live, axis=1, dtype=jnp.int32),
                  jnp.maximum(cache.next_position, seen))
    return h, cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed(graphdef, state, input_ids, vision):
    """Token embeddings with vision features written over their pad tokens ``[B,T,E]``."""
    return nnx.merge(graphdef, state).embed(input_ids, **vision)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_step(graphdef, state, cache: Cache, embeds, positions, segment_ids):
    """One prefill chunk. Returns ``(float32 logits of the chunk's last token [B,V], cache)``."""
    model = nnx.merge(graphdef, state)
    h, cache = _advance(model, cache, embeds, positions, segment_ids)
    return model.logits(h[:, -1]).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "greedy"), donate_argnames=("cache",))
def decode_step(graphdef, state, cache: Cache, tokens, key, temperature, top_p, *, top_k: int, greedy: bool):
    """Feeds ``tokens [B]`` at the cache's next positions and samples the next ones.
    Returns ``(next tokens [B], float32 logits [B,V], cache)``."""
    model = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    embeds = model.language_model.embed_tokens(tokens[:, None])
    positions = jnp.broadcast_to(cache.next_position[None, :, None], (3, B, 1))
    h, cache = _advance(model, cache, embeds, positions, jnp.ones((B, 1), jnp.int32))
    logits = model.logits(h[:, -1]).astype(jnp.float32)
    return sample(logits, key, temperature, top_p, top_k=top_k, greedy=greedy), logits, cache


def sample(logits, key, temperature, top_p, *, top_k: int, greedy: bool):
    """Greedy, or temperature sampling restricted to the ``top_k`` most likely tokens (0: all) and to the smallest
    set whose probability reaches ``top_p`` (nucleus)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    # Keep a token if the mass strictly before it is below top_p (the most likely token is always kept).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_sample = jax.jit(sample, static_argnames=("top_k", "greedy"))


def left_pad(x: np.ndarray, length: int, value, axis: int = -1) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (length - x.shape[axis], 0)
    return np.pad(x, pad, constant_values=value)


def prefill(graphdef, state, cache: Cache, embeds, positions, segment_ids, *, chunk: int = 512):
    """Chunked prefill of ``embeds [B,T,E]`` (``positions [3,B,T]``, ``segment_ids [B,T]``, left padding 0).

    The sequence is left-padded to ``bucket_length(T, chunk)`` and fed ``chunk`` tokens at a time.
    Returns ``(logits of the last token [B,V], cache)``; the cache passed in is consumed.
    """
    T = embeds.shape[1]
    Tp = bucket_length(T, chunk)
    if Tp != T:
        embeds = jnp.pad(embeds, ((0, 0), (Tp - T, 0), (0, 0)))
        positions = left_pad(np.asarray(positions), Tp, 1)
        segment_ids = left_pad(np.asarray(segment_ids), Tp, 0)
    positions = jnp.asarray(positions, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    step = min(chunk, Tp)
    logits = None
    for s in range(0, Tp, step):
        logits, cache = prefill_step(graphdef, state, cache, embeds[:, s:s + step], positions[:, :, s:s + step],
                                     segment_ids[:, s:s + step])
    return logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def embed_prefill_step(graphdef, state, cache: Cache, input_ids, vision, positions, segment_ids):
    """Embeds (vision included) and prefills one chunk in one program (a streamed frame).
    Returns ``(float32 logits of the last token [B,V], cache)``."""
    model = nnx.merge(graphdef, state)
    h, cache = _advance(model, cache, model.embed(input_ids, **vision), positions, segment_ids)
    return model.logits(h[:, -1]).astype(jnp.float32), cache
