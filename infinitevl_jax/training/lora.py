"""LoRA on a frozen base: ``W' = W + (alpha / rank) A B`` for the kernels matching the target patterns.

Adapters are a flat dict ``{name: {"a": [..., in, r], "b": [..., r, out]}}`` (a leading stacked-block axis is kept),
``a`` ~ N(0, 1/in), ``b`` = 0 so training starts from the base. ``merge`` folds them in for export
(``infinitevl merge-lora``); the training step applies the same ``merge`` inside the jitted loss, so what is trained
is exactly what is exported.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from infinitevl_jax.training.params import select


def init(base: Mapping[str, jax.Array], targets, rank: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    names = [n for n in select(base, targets) if base[n].ndim >= 2]
    if not names:
        raise ValueError(f"lora.targets {list(targets)} match no kernel")
    out = {}
    for i, n in enumerate(names):
        w = base[n]
        d_in, d_out = w.shape[-2], w.shape[-1]
        a = jax.random.normal(jax.random.fold_in(key, i), (*w.shape[:-2], d_in, rank), jnp.float32) / math.sqrt(d_in)
        out[n] = {"a": a.astype(w.dtype), "b": jnp.zeros((*w.shape[:-2], rank, d_out), w.dtype)}
    return out


def merge(base: Mapping[str, jax.Array], adapters: Mapping[str, Mapping[str, jax.Array]], rank: int,
          alpha: float) -> dict[str, jax.Array]:
    scale = alpha / rank
    out = dict(base)
    for n, ab in adapters.items():
        delta = jnp.einsum("...ir,...ro->...io", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        out[n] = (base[n].astype(jnp.float32) + scale * delta).astype(base[n].dtype)
    return out
