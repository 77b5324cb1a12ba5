"""Multimodal rotary embedding (M-RoPE) of the language stack, rotate-half convention.

Positions are ``[3, B, T]`` (temporal, height, width). The ``head_dim`` rotary channels are split by
``mrope_section`` repeated twice (e.g. [16,24,24,16,24,24]); chunk i takes its angle from component i % 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, mrope_section) -> tuple[jax.Array, jax.Array]:
    """``positions [3,B,T]`` -> ``(cos, sin)``, each ``[B,T,head_dim]`` float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [3,B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [3,B,T,D]
    # Channel c of the rotary dims reads component `component[c]`.
    sections = list(mrope_section) * 2
    component = np.concatenate([np.full((n,), i % 3) for i, n in enumerate(sections)])
    onehot = jnp.asarray(np.eye(3, dtype=np.float32)[component].T)  # [3, D]
    emb = jnp.einsum("cbtd,cd->btd", emb, onehot)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B,T,H,D]`` with ``cos/sin [B,T,D]``; computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotate_half(x32) * sin[:, :, None, :]
    return out.astype(x.dtype)
