"""Decoder layers and the hybrid stack, driven by the layer-type list (the pattern is data).

The stack finds the shortest period of ``layer_types`` (4 for InfiniteVL: SWA, GDN, GDN, GDN; 1 for the all-attention
teacher), builds one ``Block`` of that many layers, stacks ``num_layers / period`` copies of it with ``nnx.vmap`` and
runs them with ``nnx.scan``, so compile time does not grow with depth. Parameters of layer ``i`` live at
``blocks.layers[i % period]`` with leading (stacked) index ``i // period``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.config import GDN, TextConfig
from infinitevl_jax.modeling.attention import Attention
from infinitevl_jax.modeling.gated_deltanet import GatedDeltaNet
from infinitevl_jax.modeling.layers import MLP
from infinitevl_jax.modeling.norms import RMSNorm
from infinitevl_jax.sharding import constrain

HIDDEN_AXES = ("batch", "seq", "act_embed")

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def layer_period(layer_types: tuple[str, ...]) -> int:
    """Smallest p dividing the depth with ``layer_types[i] == layer_types[i % p]``."""
    n = len(layer_types)
    for p in range(1, n + 1):
        if n % p == 0 and all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


class DecoderLayer(nnx.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. Both mixer kinds live under ``self_attn`` (release names)."""

    def __init__(self, config: TextConfig, kind: str, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.kind = kind
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = GatedDeltaNet(config, **kw) if kind == GDN else Attention(config, kind, **kw)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, **kw)

    def __call__(self, x, *, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos=cos, sin=sin, segment_ids=segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x, *, cos, sin, segment_ids, q_positions, cache):
        """Cached forward (inference): returns ``(x, new cache)``; see the mixers' ``step``."""
        h = self.input_layernorm(x)
        if self.kind == GDN:
            o, cache = self.self_attn.step(h, segment_ids=segment_ids, cache=cache)
        else:
            o, cache = self.self_attn.step(h, cos=cos, sin=sin, q_positions=q_positions, cache=cache)
        x = x + o
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Block(nnx.Module):
    """One period of the layer pattern."""

    def __init__(self, config: TextConfig, kinds: tuple[str, ...], *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.layers = nnx.List(
            [DecoderLayer(config, kind, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for kind in kinds]
        )

    def __call__(self, x, *, cos, sin, segment_ids):
        for layer in self.layers:
            x = layer(x, cos=cos, sin=sin, segment_ids=segment_ids)
        return x

    def step(self, x, *, cos, sin, segment_ids, q_positions, caches):
        """``caches``: one cache per layer of the period. Returns ``(x, new caches)``."""
        out = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.step(x, cos=cos, sin=sin, segment_ids=segment_ids, q_positions=q_positions, cache=cache)
            out.append(cache)
        return x, type(caches)(out)


class HybridStack(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype=None, param_dtype=jnp.float32, remat_policy: str = "none",
                 rngs: nnx.Rngs):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        self.period = layer_period(config.layer_types)
        self.num_blocks = config.num_hidden_layers // self.period
        self.remat_policy = remat_policy
        kinds = tuple(config.layer_types[: self.period])

        @nnx.split_rngs(splits=self.num_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(config, kinds, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make(rngs)

    def __call__(self, x, *, cos, sin, segment_ids):
        policy = REMAT_POLICIES[self.remat_policy]

        def body(block, h):
            # Layer-boundary activations: batch over the data axes, hidden replicated (no-op without a mesh).
            return constrain(block(h, cos=cos, sin=sin, segment_ids=segment_ids), HIDDEN_AXES)

        if self.remat_policy != "none":
            body = nnx.remat(body, policy=policy)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        return scan(self.blocks, x)

    def step(self, x, *, cos, sin, segment_ids, q_positions, caches):
        """Cached forward (inference). ``caches``: per layer of the period, a cache whose arrays carry a leading
        ``num_blocks`` axis (stacked like the blocks), scanned alongside them. Returns ``(x, new caches)``."""

        def body(block, h, c):
            return block.step(h, cos=cos, sin=sin, segment_ids=segment_ids, q_positions=q_positions, caches=c)

        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        return scan(self.blocks, x, caches)
