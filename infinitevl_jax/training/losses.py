"""Losses over token chunks: the [tokens, vocab] logits exist for one chunk at a time, forward and backward.

Every loss returns ``(sum, count)``, never a mean, so the caller divides once by the number of target tokens of the
whole global batch (all micro-batches of gradient accumulation, all packed documents, all data shards): the gradient
is then the same however the batch was cut.

``logits_fn(h [C, E]) -> [C, V]`` is the model's head (tied or not); it is recomputed in the backward pass
(``jax.checkpoint`` per chunk), so peak memory holds ``chunk x vocab`` float32 values instead of ``tokens x vocab``
(151,936 x 32K x 4 B = 20 GB for the release at 32K).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IGNORE = -100


def _chunks(x: jax.Array, chunk: int, fill) -> jax.Array:
    """``[N, ...]`` -> ``[ceil(N/chunk), chunk, ...]`` padded with ``fill``."""
    n = x.shape[0]
    pad = (-n) % chunk
    if pad:
        x = jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), fill, x.dtype)])
    return x.reshape(-1, chunk, *x.shape[1:])


def chunked_cross_entropy(hidden: jax.Array, labels: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], *,
                          chunk_size: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-token cross-entropy. ``hidden [B,T,E]`` at positions whose *own* label is ``labels [B,T]`` (already
    shifted: ``labels[t]`` is the token predicted from position t; ``-100`` = ignore).

    Returns ``(loss_sum, target_count, correct [B,T] bool)``; ``correct`` is ``argmax == label`` (True where ignored),
    which gives exact-match of greedy answers without a generation loop.
    """
    B, T, E = hidden.shape
    h = _chunks(hidden.reshape(B * T, E), chunk_size, 0)
    y = _chunks(labels.reshape(B * T), chunk_size, IGNORE)

    @jax.checkpoint
    def one(hc, yc):
        logits = logits_fn(hc).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = yc != IGNORE
        tgt = jnp.take_along_axis(logits, jnp.where(valid, yc, 0)[:, None], axis=-1)[:, 0]
        loss = jnp.sum(jnp.where(valid, lse - tgt, 0.0))
        correct = (jnp.argmax(logits, axis=-1) == yc) | ~valid
        return loss, correct

    def body(acc, xs):
        loss, correct = one(*xs)
        return acc + loss, correct

    total, correct = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y))
    count = jnp.sum(labels != IGNORE)
    return total, count, correct.reshape(-1)[: B * T].reshape(B, T)


def chunked_kl(student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array,
               student_logits_fn: Callable, teacher_logits_fn: Callable, *, temperature: float = 2.0,
               chunk_size: int = 1024) -> tuple[jax.Array, jax.Array]:
    """``sum_t KL(softmax(z_t/T) || softmax(z_s/T)) * T^2`` over positions where ``mask [B,T]`` is true (real tokens),
    and their count. The teacher side carries no gradient."""
    B, T, E = student_hidden.shape
    hs = _chunks(student_hidden.reshape(B * T, E), chunk_size, 0)
    ht = _chunks(jax.lax.stop_gradient(teacher_hidden).reshape(B * T, -1), chunk_size, 0)
    m = _chunks(mask.reshape(B * T), chunk_size, False)

    @jax.checkpoint
    def one(sc, tc, mc):
        ls = jax.nn.log_softmax(student_logits_fn(sc).astype(jnp.float32) / temperature, axis=-1)
        lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_fn(tc)).astype(jnp.float32) / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
        return jnp.sum(jnp.where(mc, kl, 0.0)) * temperature**2

    total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.zeros((), jnp.float32), (hs, ht, m))
    return total, jnp.sum(mask)


# Naive full-logit versions: the oracles of the tests (and fine for tiny models).
def naive_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = logits.astype(jnp.float32)
    valid = labels != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, tgt, 0.0)), jnp.sum(valid)


def naive_kl(student_logits, teacher_logits, mask, temperature: float = 2.0):
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    return jnp.sum(jnp.where(mask, kl, 0.0)) * temperature**2, jnp.sum(mask)


def shift_labels(labels: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """``labels[t]`` (token t's own id where supervised) -> the target predicted *from* position t, i.e. ``labels[t+1]``,
    never across a packed-document boundary."""
    nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    if segment_ids is not None:
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], jnp.zeros_like(segment_ids[:, :1], bool)], 1)
        nxt = jnp.where(same, nxt, IGNORE)
    return nxt
