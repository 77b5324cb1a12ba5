"""Decoder layers and the hybrid stack, driven by the layer-type list (the pattern is data).

The stack finds the shortest period of ``layer_types`` (4 for InfiniteVL: SWA, GDN, GDN, GDN; 1 for the all-attention
teacher), builds one ``Block`` of that many layers, stacks ``num_layers / period`` copies of it with ``nnx.vmap`` and
runs them with ``nnx.scan``, so compile time does not grow with depth. Parameters of layer ``i`` live at
``blocks.layers[i % period]`` with leading (stacked) index ``i // period``.

The cached ``step`` (inference) is a Python loop over the blocks instead: inference passes the blocks as separate
per-block modules (``unstack_blocks``, done once outside the compiled steps), so every weight reaches its matmul as
its own buffer rather than through a dynamic slice of the stacked array (which XLA materialises as a copy).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.config import GDN, TextConfig
from infinitevl_jax.modeling.attention import Attention
from infinitevl_jax.modeling.gated_deltanet import GatedDeltaNet
from infinitevl_jax.modeling.layers import MLP, pad_rows, padded_row_count
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

    def step(self, x, *, cos, sin, segment_ids, q_positions, cache, pending=None):
        """Cached forward (inference; see the mixers' ``step``). ``pending``: an output still to be added to ``x``
        (the previous layer's MLP output), added together with this layer's first norm (``RMSNorm.add_and_norm``:
        one kernel per residual add and norm in a decode step). Returns ``(x, mlp output, new cache)``: the layer's
        output is ``x + mlp output``, left for the next layer (or the caller) to add."""
        x, h = self.input_layernorm.add_and_norm(x, pending)
        if self.kind == GDN:
            o, cache = self.self_attn.step(h, segment_ids=segment_ids, cache=cache)
        else:
            o, cache = self.self_attn.step(h, cos=cos, sin=sin, q_positions=q_positions, cache=cache)
        x, h = self.post_attention_layernorm.add_and_norm(x, o)
        return x, self.mlp(h), cache


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

    def step(self, x, *, cos, sin, segment_ids, q_positions, caches, pending=None):
        """``caches``: one cache per layer of the period; ``pending`` as ``DecoderLayer.step``. Returns
        ``(x, pending, new caches)``, the block's output being ``x + pending``."""
        out = []
        for layer, cache in zip(self.layers, caches):
            x, pending, cache = layer.step(x, cos=cos, sin=sin, segment_ids=segment_ids, q_positions=q_positions,
                                           cache=cache, pending=pending)
            out.append(cache)
        return x, pending, type(caches)(out)


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
        """Cached forward (inference), a loop over the blocks. ``caches``: one cache per layer of the stack (the
        ``infinitevl_jax.inference.cache`` layout: ``caches[i]`` for layer ``i``, no block axis). Returns
        ``(x, new caches)``, the caches in the same layout.

        ``self.blocks`` is either an ``nnx.List`` of per-block modules (``unstack_blocks``; what inference passes) or
        the stacked module, which is then sliced block by block inside the traced program (same results; the slices
        cost a copy of the weights per call).
        """
        blocks = self.blocks if isinstance(self.blocks, nnx.List) else unstack_blocks(self.blocks)
        p = self.period
        if len(caches) != len(blocks) * p:
            raise ValueError(f"expected one cache per layer ({len(blocks) * p}), got {len(caches)}")
        B, T = x.shape[:2]
        # A decode step whose products run with padding rows (``padded_row_count``) carries them through the whole
        # stack: zero rows stay zero through every norm, product and residual add, and each product's input is then
        # the previous op's output as it is (no pad and slice kernels around every product). The mixers take the
        # batch from their caches and treat rows past it as padding.
        x = pad_rows(x, padded_row_count(B) if T == 1 else B)
        out, pending = [], None
        for i, block in enumerate(blocks):
            x, pending, new = block.step(x, cos=cos, sin=sin, segment_ids=segment_ids, q_positions=q_positions,
                                         caches=tuple(caches[i * p:(i + 1) * p]), pending=pending)
            out.extend(new)
        return (x + pending)[:B], tuple(out)


def fuse_projections(blocks: nnx.List, *, delete: bool = False) -> None:
    """Inference: in every per-block layer, the projections reading the same input become one product (GDN: q, k, v,
    gate, a, b; attention: q, k, v; MLP: gate, up). Same results, fewer and larger GEMMs per step. ``delete=True``
    frees the separate arrays (only for blocks whose arrays nothing else holds)."""
    for block in blocks:
        for layer in block.layers:
            layer.self_attn.fuse_projections(delete=delete)
            layer.mlp.fuse_projections(delete=delete)


@jax.jit
def _index_block(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def unstack_blocks(blocks: Block, *, consume: bool = False) -> nnx.List:
    """The stacked ``blocks`` (leading axis ``num_blocks`` on every array) as an ``nnx.List`` of per-block ``Block``
    modules holding their own arrays (copies of the slices).

    Works inside a traced program (the step's fallback) and outside (inference, once). ``consume=True`` (outside only)
    deletes each stacked array as soon as it is sliced, so the conversion needs one stacked array's worth of extra
    memory rather than a second copy of the blocks; the module passed in is unusable afterwards.
    """
    graphdef, state = nnx.split(blocks)
    leaves, treedef = jax.tree.flatten(state)
    n = leaves[0].shape[0]
    per_leaf = []
    for x in leaves:
        per_leaf.append([_index_block(x, i) for i in range(n)])
        if consume:  # free the stacked array once its slices exist (peak: one stacked array extra)
            jax.block_until_ready(per_leaf[-1])
            x.delete()
    return nnx.List([nnx.merge(graphdef, jax.tree.unflatten(treedef, [p[i] for p in per_leaf])) for i in range(n)])
