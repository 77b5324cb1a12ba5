"""Inference caches, stacked like the layer blocks so they flow through the stack's ``nnx.scan``.

Per layer kind (REFERENCE section 8):
- sliding-window attention: a ring buffer of the last ``window - 1`` keys/values (``AttentionCache``);
- Gated DeltaNet: the last ``conv_size - 1`` inputs of the q, k and v short convolutions and the ``[H, K, V]``
  recurrent state, float32 by default (``GDNCache``);
- full attention (the teacher): a preallocated ``AttentionCache`` of ``max_length`` slots.
Apart from the teacher's, the size never depends on how many tokens or frames have been seen.

``Cache.layers[j]`` holds layer ``j`` of the period for every block: each array has a leading ``num_blocks`` axis, so
layer ``i`` of the stack is ``layers[i % period][i // period]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from infinitevl_jax.config import FULL, GDN, InfiniteVLConfig
from infinitevl_jax.modeling.decoder import layer_period


class AttentionCache(NamedTuple):
    k: jax.Array  # [N, B, L, Hkv, D]
    v: jax.Array  # [N, B, L, Hkv, D]
    positions: jax.Array  # [N, B, L] int32: sequence index held by each slot, -1 when empty


class GDNCache(NamedTuple):
    conv_q: jax.Array  # [N, B, W-1, H*K]
    conv_k: jax.Array  # [N, B, W-1, H*K]
    conv_v: jax.Array  # [N, B, W-1, H*V]
    state: jax.Array  # [N, B, H, K, V] float32


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
        return jax.tree.map(jnp.copy, self)

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def init_cache(config: InfiniteVLConfig, batch_size: int, *, max_length: int | None = None, dtype=jnp.float32,
               state_dtype=jnp.float32) -> Cache:
    """An empty cache. ``max_length`` is required when the stack has full-attention layers (the teacher);
    ``dtype`` is the K/V and conv-state dtype, ``state_dtype`` the GDN recurrent state's."""
    c = config.text
    period = layer_period(c.layer_types)
    n = c.num_hidden_layers // period
    B = batch_size
    layers = []
    for kind in c.layer_types[:period]:
        if kind == GDN:
            kd, vd = c.num_linear_heads * c.linear_head_dim, c.num_linear_heads * c.linear_value_dim
            w = c.conv_size - 1
            layers.append(GDNCache(
                jnp.zeros((n, B, w, kd), dtype), jnp.zeros((n, B, w, kd), dtype), jnp.zeros((n, B, w, vd), dtype),
                jnp.zeros((n, B, c.num_linear_heads, c.linear_head_dim, c.linear_value_dim), state_dtype)))
        else:
            if kind == FULL or c.sliding_window is None:
                if max_length is None:
                    raise ValueError("a full-attention layer needs max_length for its preallocated KV cache")
                length = int(max_length)
            else:
                length = max(int(c.sliding_window) - 1, 1)
            shape = (n, B, length, c.num_key_value_heads, c.head_dim)
            layers.append(AttentionCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                                         jnp.full((n, B, length), -1, jnp.int32)))
    return Cache(tuple(layers), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32))


def needs_max_length(config: InfiniteVLConfig) -> bool:
    c = config.text
    return any(k == FULL or (k != GDN and c.sliding_window is None) for k in c.layer_types)
