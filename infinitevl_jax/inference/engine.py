"""Jitted prefill and decode over a ``Cache``: the pieces ``generate`` and ``StreamingSession`` are made of.

Shapes are bucketed so that a session compiles a handful of programs: prefill chunks have ``chunk`` tokens (a prompt
shorter than one chunk is left-padded to a power of two >= 16), the decode step always has one token per row, and the
cache is donated to every step so its buffers are reused in place (memory stays flat however long the stream).

Sequence indices (``q_positions``, what the SWA ring buffer and the causal masks use) count the real tokens of a
row; M-RoPE positions (``position_ids``) are separate and follow the release's rule. Batches are left-padded.

The steps take ``(graphdef, state)``: either ``nnx.split(model)`` or, what ``generate``, ``StreamingSession`` and
``InfiniteVL`` use, ``split(model)`` / ``prepare(model)``: a copy of the model whose decoder blocks are separate
per-block modules (``unstack_blocks``), made once outside the steps, so that no weight is copied out of a stacked
array inside them. Its state is passed as a flat tuple of arrays and its static half hashes once, which keeps the
per-call dispatch cost of a several-hundred-array model small.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.inference.cache import Cache, init_cache
from infinitevl_jax.modeling.decoder import fuse_projections, unstack_blocks

MIN_BUCKET = 16


def bucket_length(n: int, chunk: int) -> int:
    """Padded prompt length: a power of two >= 16 up to ``chunk``, then a multiple of ``chunk``."""
    if n > chunk:
        return -(-n // chunk) * chunk
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), chunk)


class PreparedDef:
    """The static half of a prepared model: its graphdef and the tree structure of its flat state, hashed once (an
    ``nnx.GraphDef`` hashes in time proportional to the model's size, and jit hashes static arguments on every call).
    """

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, PreparedDef) and self._hash == other._hash
                                 and self.graphdef == other.graphdef and self.treedef == other.treedef)

    def merge(self, leaves):
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


@dataclasses.dataclass(frozen=True, eq=False)
class InferenceModel:
    """A model ready for the cached steps (``prepare``): ``(graphdef, state)`` to pass to them, plus the config and
    compute dtype. Holds the per-block weights and the other parameters, not the stacked blocks."""

    graphdef: PreparedDef
    state: tuple
    config: Any
    dtype: Any

    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state)


def split(model, *, consume: bool = False, fuse: bool = True) -> tuple[PreparedDef, tuple]:
    """``(graphdef, state)`` for the steps: a copy of ``model`` whose decoder blocks are per-block modules, with
    the projections that read the same input fused into one product each (``fuse``; ``decoder.fuse_projections``).

    Only the decoder blocks are copied (once, sliced out of the stacked arrays); every other parameter is shared with
    ``model``. While ``model`` lives the blocks are held twice; ``consume=True`` (for a model nothing else holds)
    deletes each stacked array as soon as it is sliced, so memory stays at one copy (plus one stacked array during
    the conversion) and ``model`` must not be used afterwards.
    """
    graphdef, state = nnx.split(model)
    shell = nnx.merge(graphdef, state)  # new module objects over the same arrays
    stack = shell.language_model.layers
    copied = not isinstance(stack.blocks, nnx.List)
    if copied:
        stack.blocks = unstack_blocks(stack.blocks, consume=consume)
    if fuse and _fusable(leaf for leaf in jax.tree.leaves(nnx.state(stack.blocks))):
        # The per-block arrays are the copies made just above (or ``model``'s own when it was already unstacked,
        # which are then kept).
        fuse_projections(stack.blocks, delete=copied)
    graphdef, state = nnx.split(shell)
    leaves, treedef = jax.tree.flatten(state)
    return PreparedDef(graphdef, treedef), tuple(leaves)


def _fusable(leaves) -> bool:
    """Fusing concatenates weights along their output axis: done on one device or with replicated weights, not
    with weights split over a mesh (where the fused product would need its own layout)."""
    for x in leaves:
        s = getattr(x, "sharding", None)
        if s is not None and not isinstance(s, jax.sharding.SingleDeviceSharding) and not s.is_fully_replicated:
            return False
    return True


def prepare(model, *, consume: bool = False, fuse: bool = True) -> InferenceModel:
    """``model`` (an ``InfiniteVLForConditionalGeneration``) as an ``InferenceModel``; an ``InferenceModel`` is
    returned as is. See ``split`` for ``consume``, ``fuse`` and memory."""
    if isinstance(model, InferenceModel):
        return model
    graphdef, state = split(model, consume=consume, fuse=fuse)
    return InferenceModel(graphdef, state, model.config, model.dtype)


def _merge(graphdef, state):
    return graphdef.merge(state) if isinstance(graphdef, PreparedDef) else nnx.merge(graphdef, state)


def cache_sharding(state) -> jax.sharding.Sharding | None:
    """Where a cache for these weights goes: their device, or replicated over their mesh (None: the default)."""
    leaf = next(iter(jax.tree.leaves(state)), None)
    s = getattr(leaf, "sharding", None)
    if isinstance(s, jax.sharding.SingleDeviceSharding):
        return s
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return None


def new_cache(model: InferenceModel, batch_size: int, *, max_length: int | None = None, dtype=None) -> Cache:
    """``init_cache`` for ``model``'s config, in its compute dtype (default) and placed with its weights."""
    return init_cache(model.config, batch_size, max_length=max_length, dtype=dtype or (model.dtype or jnp.float32),
                      sharding=cache_sharding(model.state))


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
    return _merge(graphdef, state).embed(input_ids, **vision)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_step(graphdef, state, cache: Cache, embeds, positions, segment_ids):
    """One prefill chunk. Returns ``(float32 logits of the chunk's last token [B,V], cache)``."""
    model = _merge(graphdef, state)
    h, cache = _advance(model, cache, embeds, positions, segment_ids)
    return model.logits(h[:, -1]).astype(jnp.float32), cache


# XLA options for compiling the decode step, per platform (``jax.default_backend()``): empty by default. The step is
# compiled once per (batch, cache) shape and then runs once per generated token, so a long-running server may want
# XLA's GEMM autotuner to try every tiling of the step's few distinct products instead of its default shortlist
# (``EXHAUSTIVE_GEMM_TILING``): for the 4B model on an H200 the first call then takes ~35 s longer (49 s instead of
# 13) and every token ~2.5% less time (``benchmarks/inference.py --tune-decode``), which pays back only after
# hundreds of thousands of tokens, or across processes with JAX's persistent compilation cache
# (``jax_compilation_cache_dir``). Autotuning results are shared within a process: products of a shape tuned once
# keep their tiling in programs compiled later. Example: ``DECODE_COMPILER_OPTIONS["gpu"] = EXHAUSTIVE_GEMM_TILING``.
EXHAUSTIVE_GEMM_TILING = {"xla_gpu_exhaustive_tiling_search": True}
DECODE_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {}


class _PlatformJit:
    """``jax.jit(fn, **jit_kwargs)`` compiled with ``options[jax.default_backend()]`` (looked up at each call, so a
    change to the table applies to later calls); attributes such as ``lower`` come from the jit in use."""

    def __init__(self, fn, options: dict, **jit_kwargs):
        self._fn, self._options, self._kwargs, self._jits = fn, options, jit_kwargs, {}
        functools.update_wrapper(self, fn)

    def _jit(self):
        opts = self._options.get(jax.default_backend()) or {}
        key = tuple(sorted(opts.items()))
        jitted = self._jits.get(key)
        if jitted is None:
            jitted = self._jits[key] = jax.jit(self._fn, compiler_options=dict(opts) or None, **self._kwargs)
        return jitted

    def __call__(self, *args, **kwargs):
        return self._jit()(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jit(), name)


def _decode_step(graphdef, state, cache: Cache, tokens, key, temperature, top_p, *, top_k: int, greedy: bool):
    """Feeds ``tokens [B]`` at the cache's next positions and samples the next ones.
    Returns ``(next tokens [B], float32 logits [B,V], cache)``."""
    model = _merge(graphdef, state)
    B = tokens.shape[0]
    embeds = model.language_model.embed_tokens(tokens[:, None])
    positions = jnp.broadcast_to(cache.next_position[None, :, None], (3, B, 1))
    h, cache = _advance(model, cache, embeds, positions, jnp.ones((B, 1), jnp.int32))
    logits = model.logits(h[:, -1]).astype(jnp.float32)
    return sample(logits, key, temperature, top_p, top_k=top_k, greedy=greedy), logits, cache


decode_step = _PlatformJit(_decode_step, DECODE_COMPILER_OPTIONS, static_argnames=("graphdef", "top_k", "greedy"),
                           donate_argnames=("cache",))


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
    model = _merge(graphdef, state)
    h, cache = _advance(model, cache, model.embed(input_ids, **vision), positions, segment_ids)
    return model.logits(h[:, -1]).astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def frames_prefill_step(graphdef, state, cache: Cache, pixel_values, layout, positions):
    """Prefills ``k`` streamed frames of one grid in one program (batch 1).

    ``pixel_values [k, P, patch_dim]``: each frame's patch rows; ``layout``: the ``VisionLayout`` of one frame (the
    tower runs on each frame separately, vmapped, so its attention stays per frame); ``positions [3, 1, k*n]``: the
    M-RoPE positions of the ``k * n`` image tokens, frame after frame. The LM sees one chunk of ``k * n`` tokens.
    Returns ``(float32 logits of the last token [1,V], cache)``; equal to ``k`` calls of ``embed_prefill_step``.
    """
    model = _merge(graphdef, state)
    tower = nnx.vmap(lambda visual, px: visual(px, layout), in_axes=(None, 0))
    feats = tower(model.visual, pixel_values)  # [k, n, E]
    dtype = model.language_model.embed_tokens(jnp.zeros((1, 1), jnp.int32)).dtype  # what ``embed`` casts to
    embeds = feats.reshape(1, -1, feats.shape[-1]).astype(dtype)
    h, cache = _advance(model, cache, embeds, positions, jnp.ones(embeds.shape[:2], jnp.int32))
    return model.logits(h[:, -1]).astype(jnp.float32), cache
