"""Chunked cross-entropy and KL equal the full-logit versions (values and gradients), and the compiled step holds no
[tokens, vocab] float32 buffer for the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.training import losses

jax.config.update("jax_enable_x64", False)


def _data(B=2, T=37, E=16, V=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(k[0], (B, T, E))
    ht = jax.random.normal(k[1], (B, T, E))
    w = jax.random.normal(k[2], (E, V)) * 0.3
    wt = jax.random.normal(k[3], (E, V)) * 0.3
    labels = jax.random.randint(k[4], (B, T), 0, V)
    labels = labels.at[:, :5].set(-100).at[1, 20:].set(-100)
    mask = labels != -100
    return h, ht, w, wt, labels, mask


def test_chunked_ce_matches_naive_values_and_grads():
    h, _, w, _, labels, _ = _data()

    def chunked(h, w):
        s, c, _ = losses.chunked_cross_entropy(h, labels, lambda x: x @ w, chunk_size=8)
        return s / c

    def naive(h, w):
        s, c = losses.naive_cross_entropy(h @ w, labels)
        return s / c

    np.testing.assert_allclose(chunked(h, w), naive(h, w), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_kl_matches_naive_values_and_grads():
    h, ht, w, wt, _, mask = _data(seed=1)

    def chunked(h, w):
        s, c = losses.chunked_kl(h, ht, mask, lambda x: x @ w, lambda x: x @ wt, temperature=2.0, chunk_size=8)
        return s / c

    def naive(h, w):
        s, c = losses.naive_kl(h @ w, ht @ wt, mask, 2.0)
        return s / c

    np.testing.assert_allclose(chunked(h, w), naive(h, w), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(naive, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shift_labels_stops_at_document_boundary():
    labels = jnp.array([[-100, 5, 6, -100, 7, 8]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(losses.shift_labels(labels, seg), [[5, 6, -100, 7, 8, -100]])


def test_no_full_logits_buffer_in_compiled_step():
    B, T, E, V, C = 1, 2048, 32, 4096, 128  # full f32 logits: 32 MiB; one chunk: 2 MiB
    h = jnp.zeros((B, T, E))
    w = jnp.zeros((E, V))
    labels = jnp.zeros((B, T), jnp.int32)

    def loss(h, w):
        s, c, _ = losses.chunked_cross_entropy(h, labels, lambda x: x @ w, chunk_size=C)
        return s / c

    compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(h, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < B * T * V * 4 / 4, f"temporary memory {temp} B suggests a full [tokens, vocab] logits buffer"
    hlo = compiled.as_text()
    assert f"f32[{B * T},{V}]" not in hlo and f"f32[{B},{T},{V}]" not in hlo
