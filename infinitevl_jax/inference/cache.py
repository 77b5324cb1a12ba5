"""Inference caches: one per decoder layer, each layer's arrays its own buffers (donated to, and updated in place
by, every step).

Per layer kind (REFERENCE section 8):
- sliding-window attention: a ring buffer of the last ``window - 1`` keys/values (``AttentionCache``);
- Gated DeltaNet: the last ``conv_size - 1`` inputs of the q, k and v short convolutions and the ``[H, K, V]``
  recurrent state, float32 by default (``GDNCache``);
- full attention (the teacher): a preallocated ``AttentionCache`` of ``max_length`` slots.
Apart from the teacher's, the size never depends on how many tokens or frames have been seen.

``Cache.layers[i]`` is layer ``i`` of the stack (``HybridStack.step`` runs the blocks as a loop, so nothing is stacked).
``init_cache`` returns committed arrays placed like the steps' outputs, so the first step compiles the same program as
every later one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from infinitevl_jax.config import FULL, GDN, InfiniteVLConfig


class AttentionCache(NamedTuple):
    k: jax.Array  # [B, L, Hkv, D]
    v: jax.Array  # [B, L, Hkv, D]
    positions: jax.Array  # [B, L] int32: sequence index held by each slot, -1 when empty


class GDNCache(NamedTuple):
    conv_q: jax.Array  # [B, W-1, H*K]
    conv_k: jax.Array  # [B, W-1, H*K]
    conv_v: jax.Array  # [B, W-1, H*V]
    state: jax.Array  # [B, H, K, V] float32


@struct.dataclass
class Cache:
    """Everything a continued sequence needs. ``length [B]``: tokens seen (the next sequence index);
    ``next_position [B]``: the M-RoPE position of the next text token (max over the seen positions + 1)."""

    layers: tuple
    length: jax.Array
    next_position: jax.Array

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    def copy(self) -> "Cache":
        """A copy with its own buffers (the jitted steps donate the cache they are given)."""
        return _copy(self)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def init_cache(config: InfiniteVLConfig, batch_size: int, *, max_length: int | None = None, dtype=jnp.float32,
               state_dtype=jnp.float32, sharding: jax.sharding.Sharding | None = None) -> Cache:
    """An empty cache. ``max_length`` is required when the stack has full-attention layers (the teacher);
    ``dtype`` is the K/V and conv-state dtype, ``state_dtype`` the GDN recurrent state's.

    The arrays are committed to ``sharding`` (default: the default device), as a step's outputs are: a step returns
    committed arrays whenever one of its inputs is (the cache, or weights restored onto a device), and an uncommitted
    first cache would make the first call lower and compile a second program.
    """
    c = config.text
    if max_length is None and needs_max_length(config):
        raise ValueError("a full-attention layer needs max_length for its preallocated KV cache")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return _constructor(c, int(batch_size), None if max_length is None else int(max_length), jnp.dtype(dtype),
                        jnp.dtype(state_dtype), sharding)()


def _build(c, B, max_length, dtype, state_dtype) -> Cache:
    layers = []
    for kind in c.layer_types:
        if kind == GDN:
            kd, vd = c.num_linear_heads * c.linear_head_dim, c.num_linear_heads * c.linear_value_dim
            w = c.conv_size - 1
            layers.append(GDNCache(
                jnp.zeros((B, w, kd), dtype), jnp.zeros((B, w, kd), dtype), jnp.zeros((B, w, vd), dtype),
                jnp.zeros((B, c.num_linear_heads, c.linear_head_dim, c.linear_value_dim), state_dtype)))
        else:
            if kind == FULL or c.sliding_window is None:
                length = max_length
            else:
                length = max(int(c.sliding_window) - 1, 1)
            shape = (B, length, c.num_key_value_heads, c.head_dim)
            layers.append(AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                         jnp.full((B, length), -1, jnp.int32)))
    return Cache(tuple(layers), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))


@functools.lru_cache(maxsize=64)
def _constructor(c, B, max_length, dtype, state_dtype, sharding):
    """A compiled program writing the empty cache straight into ``sharding`` (cached per shape and placement)."""
    fn = lambda: _build(c, B, max_length, dtype, state_dtype)
    return jax.jit(fn, out_shardings=jax.tree.map(lambda _: sharding, jax.eval_shape(fn)))


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def needs_max_length(config: InfiniteVLConfig) -> bool:
    c = config.text
    return any(k == FULL or (k != GDN and c.sliding_window is None) for k in c.layer_types)
