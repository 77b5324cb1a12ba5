"""Softmax attention layer (GQA, M-RoPE), used full-causal by the teacher and sliding-window by InfiniteVL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax import ops
from infinitevl_jax.config import SWA, TextConfig
from infinitevl_jax.modeling.layers import check_step_rows, fuse_linears, linear, padded_row_count, split_last
from infinitevl_jax.modeling.rope import apply_rotary


class Attention(nnx.Module):
    """q/k/v projections with bias, o_proj without; a query sees itself and the previous ``window - 1`` tokens.

    ``window`` is ``config.sliding_window`` for sliding-window layers and ``None`` (full causal) otherwise.
    """

    def __init__(self, config: TextConfig, kind: str, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window if kind == SWA else None
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("q_heads", "embed"), **kw)
        self.qkv_proj = nnx.data(None)  # inference: q, k and v as one product (``fuse_projections``)

    def fuse_projections(self, *, delete: bool = False) -> None:
        """Replace ``q_proj``, ``k_proj`` and ``v_proj`` by one ``qkv_proj`` (same results; ``fuse_linears``)."""
        if self.qkv_proj is None:
            self.qkv_proj = nnx.data(fuse_linears([self.q_proj, self.k_proj, self.v_proj], delete=delete))
            self.q_proj = self.k_proj = self.v_proj = nnx.data(None)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array, rows: int | None = None):
        """``x [B,T,E]`` -> rotated ``q [B,T,Hq,D]``, ``k [B,T,Hkv,D]`` and ``v [B,T,Hkv,D]``; ``rows``: keep only
        the first ``rows`` rows of the products (``x`` carrying padding rows)."""
        if self.qkv_proj is not None:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = split_last(self.qkv_proj(x)[:rows], (self.num_heads * self.head_dim, kv, kv))
        else:
            q, k, v = self.q_proj(x)[:rows], self.k_proj(x)[:rows], self.v_proj(x)[:rows]
        B, T = q.shape[:2]
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        q, k, v = self.project(x, cos, sin)
        o = ops.attention(q, k, v, window=self.window, segment_ids=segment_ids)
        return self.o_proj(o.reshape(*x.shape[:2], -1))

    def step(self, x: jax.Array, *, cos: jax.Array, sin: jax.Array, q_positions: jax.Array, cache):
        """Cached forward of a chunk ``x [B,C,E]`` (inference; C = 1 for decode).

        ``q_positions [B,C]``: sequence index of each token (-1 on padding, which is neither attended nor cached).
        ``cache``: ``(k [B,L,Hkv,D], v [B,L,Hkv,D], positions [B,L])``, a ring buffer of ``L = window - 1`` slots
        (or the maximum length for full attention). Returns ``(out [B,C,E], new cache of the same type)``.
        """
        B, R, C = cache[0].shape[0], x.shape[0], x.shape[1]
        check_step_rows(R, B, C)
        rows = padded_row_count(B) if C == 1 else B  # decode: the o_proj input at the rows its product runs with
        if C == 1 and self.qkv_proj is not None and ops.rotary_decode_kernels(
                self.num_heads, self.num_kv_heads, self.head_dim, cache[0].shape[1]):
            # the decode kernels read the projection as it comes out of its product and rotate q and k themselves
            qkv = self.qkv_proj(x).reshape(R, -1)
            o, *new = ops.attention_decode_rotary(qkv, cos[:B, 0], sin[:B, 0], *cache, q_positions,
                                                  num_heads=self.num_heads, window=self.window, out_rows=rows)
        else:
            q, k, v = self.project(x, cos, sin, rows=B)
            o, *new = ops.attention_with_cache_update(q, k, v, *cache, q_positions, window=self.window,
                                                      out_rows=rows)
        return self.o_proj(o.reshape(rows, C, -1))[:R], type(cache)(*new)
