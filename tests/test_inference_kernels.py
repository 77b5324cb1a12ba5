"""The inference paths' kernels: the one-token gated delta rule step, and the SWA cache attention as ``"auto"`` sends
prefill chunks to it on GPUs (Pallas kernel in interpret mode on CPU, plus its Triton lowering at the model's shape)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels.gated_delta_rule import fused_recurrent_gated_delta_rule, naive_recurrent_gated_delta_rule
from pallas_kernels.gated_delta_rule.fused_recurrent import decode_step
from pallas_kernels.sliding_window_attention import (PALLAS_CACHE_MIN_CHUNK, attend_to_cache,
                                                     attend_to_cache_reference, attention_reference,
                                                     choose_cache_backend, init_ring_buffer, ring_buffer_write)
from pallas_kernels.sliding_window_attention import attention as swa_attention
from pallas_kernels.sliding_window_attention import cache as swa_cache


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------- GDN decode


def gdn_token(seed, B, H, K, V, *, gate, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, 1, H, K), dtype)
    k = jax.random.normal(ks[1], (B, 1, H, K), dtype)
    v = jax.random.normal(ks[2], (B, 1, H, V), dtype)
    a = jax.random.normal(ks[3], (B, 1, H))
    g = {"near0": -0.01 * jax.nn.sigmoid(a), "strong": -2.0 - 3.0 * jax.nn.sigmoid(a), "mixed": -jax.nn.softplus(a)}
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, 1, H))).astype(dtype)
    return q, k, v, g[gate], beta, jax.random.normal(ks[5], (B, H, K, V))


@pytest.mark.parametrize("gate", ["near0", "strong", "mixed"])
@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gdn_decode_step_matches_token_recurrence(gate, init, dtype):
    """The fused one-token update equals the float32 recurrence to float32 rounding (state and output)."""
    q, k, v, g, beta, h0 = gdn_token(zlib.crc32(f"{gate}{init}".encode()), 2, 4, 32, 64, gate=gate, dtype=dtype)
    h0 = h0 if init else None
    o, s = jax.jit(lambda *a: fused_recurrent_gated_delta_rule(*a, initial_state=h0, output_final_state=True))(
        q, k, v, g, beta)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == v.dtype and s.dtype == jnp.float32 and s.shape == s_ref.shape
    assert rel(s, s_ref) <= 1e-6, rel(s, s_ref)
    # bfloat16 outputs: both round the same float32 value; allow one bf16 ulp where the float32 values straddle
    assert rel(o, o_ref) <= (1e-6 if dtype == jnp.float32 else 1e-2), rel(o, o_ref)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-6, rtol=1e-5)


def test_gdn_decode_step_options_and_dispatch():
    q, k, v, g, beta, h0 = gdn_token(7, 1, 2, 16, 8, gate="mixed")
    # no L2 norm, explicit scale, no final state
    o, s = decode_step(q, k, v, g, beta, scale=0.3, initial_state=h0, use_qk_l2norm=False)
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, use_qk_l2norm=False)
    assert s is None and rel(o, o_ref) <= 1e-6
    # segment ids cannot reset a single token; T > 1 still runs the recurrence
    seg = jnp.array([[3]], jnp.int32)
    o1, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(decode_step(q, k, v, g, beta, initial_state=h0)[0]))
    q3, k3, v3, g3, b3 = (jnp.concatenate([x] * 3, axis=1) for x in (q, k, v, g, beta))
    o3, _ = fused_recurrent_gated_delta_rule(q3, k3, v3, g3, b3, initial_state=h0)
    o3_ref, _ = naive_recurrent_gated_delta_rule(q3, k3, v3, g3, b3, initial_state=h0)
    np.testing.assert_array_equal(np.asarray(o3), np.asarray(o3_ref))
    with pytest.raises(ValueError, match="one token"):
        decode_step(q3, k3, v3, g3, b3)


def decode_mixer_args(seed, B, R, H, K, V, dtype, W=4):
    ks = jax.random.split(jax.random.key(seed), 10)
    N = 2 * H * (K + V + 1)
    proj = jax.random.normal(ks[0], (R, N), dtype)
    conv = [jax.random.normal(ks[i + 1], (B, W - 1, H * d), dtype) for i, d in enumerate((K, K, V))]
    conv_w = (jax.random.uniform(ks[4], (W, H * (2 * K + V)), jnp.float32, -0.5, 0.5)).astype(dtype)
    A_log = jnp.log(jax.random.uniform(ks[5], (H,), jnp.float32, 1.0, 16.0))
    dt_bias = jax.random.normal(ks[6], (H,)) - 3.0
    o_norm = (1.0 + 0.1 * jax.random.normal(ks[7], (V,))).astype(dtype)
    live = jnp.arange(B) % 3 != 2  # every third row a padding token
    state = jax.random.normal(ks[8], (B, H, K, V))
    return (proj, *conv, conv_w, A_log, dt_bias, o_norm, live, state)


@pytest.mark.parametrize("B,R,H,K,V", [(1, 2, 2, 16, 32), (3, 3, 4, 32, 32), (2, 2, 2, 64, 128), (1, 1, 2, 128, 256)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gdn_decode_mixer_kernels(B, R, H, K, V, dtype):
    """The two decode-mixer kernels (interpret mode) against the reference, which ``test_inference_steps`` holds to
    the model's general path: the o_proj input (padding rows past B zero), the shifted conv windows, the state."""
    from pallas_kernels.gated_delta_rule import decode_mixer as dm

    args = decode_mixer_args(zlib.crc32(f"{B}{R}{H}{K}{V}".encode()), B, R, H, K, V, dtype)
    kw = dict(num_heads=H, head_k=K, head_v=V, eps=1e-6)
    ref = jax.jit(lambda *a: dm.decode_mixer(*a, **kw, backend="xla"))(*args)
    got = jax.jit(lambda *a: dm.decode_mixer(*a, **kw, backend="pallas_gpu"))(*args)
    for name, a, b in zip(("y", "conv_q", "conv_k", "conv_v", "state"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        # bf16: q/k/v are rounded to bf16 after SiLU in both; an ulp where the roundings differ moves the outputs by
        # ~1e-2 and the float32 state (built from them) by ~1e-3
        tol = 1e-5 if dtype == jnp.float32 else 2e-3 if name == "state" else 2e-2
        assert rel(a, b) <= tol, (name, rel(a, b))
    assert got[0].shape == (R, H * V) and not np.any(np.asarray(got[0][B:]))
    # conv windows shift exactly; a padding row's token enters them as zeros
    for new, old in zip(got[1:4], args[1:4]):
        np.testing.assert_array_equal(np.asarray(new[:, :-1]), np.asarray(old[:, 1:]))
    live = np.asarray(args[-2])
    assert not np.any(np.asarray(got[1])[~live, -1])
    if R > B:  # rows past B are ignored
        args2 = (args[0].at[B:].set(jnp.nan),) + args[1:]
        got2 = jax.jit(lambda *a: dm.decode_mixer(*a, **kw, backend="pallas_gpu"))(*args2)
        for a, b in zip(got2, got):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gdn_decode_mixer_dispatch_and_errors():
    from pallas_kernels.gated_delta_rule import decode_mixer as dm

    assert dm.resolve_backend("auto", 128, 256, 4) == ("pallas_gpu" if jax.default_backend() == "gpu" else "xla")
    assert dm.resolve_backend("auto", 128, 96, 4) == "xla"  # not a power of two: the reference
    with pytest.raises(ValueError, match="does not support"):
        dm.resolve_backend("pallas_gpu", 128, 96, 4)
    args = decode_mixer_args(1, 2, 2, 2, 16, 32, jnp.float32)
    kw = dict(num_heads=2, head_k=16, head_v=32, eps=1e-6)
    with pytest.raises(ValueError, match="proj must be"):
        dm.decode_mixer(args[0][:1], *args[1:], **kw)
    with pytest.raises(ValueError, match="state must be"):
        dm.decode_mixer(*args[:-1], args[-1][:1], **kw)
    with pytest.raises(ValueError, match="backend must be"):
        dm.decode_mixer(*args, **kw, backend="cuda")


def test_gdn_decode_mixer_gpu_lowering():
    """Triton lowering at the 4B model's decode shape (H 16, K 128, V 256, bf16, one row padded to two), conv
    windows and state donated and aliased in place."""
    from pallas_kernels import _compat
    from pallas_kernels.gated_delta_rule import decode_mixer as dm

    args = decode_mixer_args(2, 1, 2, 16, 128, 256, jnp.bfloat16)
    f = lambda *a: dm.decode_mixer_gpu(*a, num_heads=16, head_k=128, head_v=256, eps=1e-6)
    with _compat.compiled():
        text = jax.jit(f, donate_argnums=(1, 2, 3, 9)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "gdn_decode_mix" in text and "gdn_decode_out" in text and text.count("tf.aliasing_output") == 4


# ----------------------------------------------------------------------------- SWA cache attention


def draw(name, b, t, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(zlib.crc32(name.encode())), 3)
    return (jax.random.normal(kq, (b, t, hq, d), dtype), jax.random.normal(kk, (b, t, hkv, d), dtype),
            jax.random.normal(kv, (b, t, hkv, d), dtype))


def run_chunks(attend, q, k, v, window, length, chunk, lead_pad=0):
    """A sequence fed chunk by chunk through ``attend`` + ``ring_buffer_write``; the first chunk has ``lead_pad``
    padding queries in front (a left-padded prompt), the last is padded at the end."""
    b, t, _, d = q.shape
    cache = init_ring_buffer(b, length, k.shape[2], d, jnp.float32)

    @jax.jit
    def step(cache, qc, kc, vc, pos):
        return attend(qc, kc, vc, *cache, pos, window=window), ring_buffer_write(*cache, kc, vc, pos)

    outs, s, first = [], 0, True
    while s < t:
        n = min(chunk - (lead_pad if first else 0), t - s)
        front = lead_pad if first else 0
        pad = lambda x: jnp.pad(x[:, s:s + n], ((0, 0), (front, chunk - n - front), (0, 0), (0, 0)))
        pos = np.full(chunk, -1, np.int32)
        pos[front:front + n] = np.arange(s, s + n)
        o, cache = step(cache, pad(q), pad(k), pad(v), jnp.broadcast_to(jnp.asarray(pos), (b, chunk)))
        assert np.all(np.isfinite(np.asarray(o)))
        outs.append(o[:, front:front + n])
        s, first = s + n, False
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("chunk,lead_pad", [(64, 0), (128, 37)])
def test_pallas_cache_kernel_at_prefill_chunks(chunk, lead_pad):
    """The kernel as ``"auto"`` runs it for prefill chunks (launch config by chunk length, here 128-row blocks), in
    interpret mode: a 99-slot ring (not a multiple of the 64-key block: the shifted last block) that wraps several
    times, 8 query heads per kv head, a left-padded first chunk."""
    window, t = 100, 420
    assert chunk >= PALLAS_CACHE_MIN_CHUNK
    assert swa_cache.launch_config(chunk, 8)["block_q"] == 128
    q, k, v = draw(f"prefill{chunk}", 1, t, 8, 1, 16)
    full = attention_reference(q, k, v, window=window)
    kernel = lambda *a, **kw: swa_cache.attend_to_cache_pallas(*a, **kw, interpret=True)
    got = run_chunks(kernel, q, k, v, window, window - 1, chunk, lead_pad)
    assert rel(got, full) <= 1e-5, rel(got, full)
    ref = run_chunks(attend_to_cache_reference, q, k, v, window, window - 1, chunk, lead_pad)
    assert rel(got, ref) <= 1e-5


def test_pallas_cache_kernel_bounds_skip_invisible_blocks():
    """The per-row-block key ranges: future chunk blocks and slots older than the window are left out, and an
    all-padding row block walks nothing."""
    bq, bk, window = 4, 4, 10
    # cache: 16 slots holding positions 100..115 (slot i = position 100 + i); chunk of 8 queries 116..123, then padding
    cpos = (100 + jnp.arange(16, dtype=jnp.int32))[None]
    kpos = jnp.concatenate([116 + jnp.arange(8, dtype=jnp.int32), jnp.full((8,), -1, jnp.int32)])[None]
    rpos = kpos  # one query head per kv head: rows are the chunk's queries
    b = np.asarray(swa_cache._key_block_bounds(rpos, cpos, kpos, window=window, block_q=bq, block_k=bk))[0]
    # rows 116..119 see slots with positions in (106, 119) -> slots 7..15 -> cache blocks 1..3; chunk block 0 only
    np.testing.assert_array_equal(b[0], [1, 4, 0, 1])
    # rows 120..123 see positions (110, 123) -> slots 11..15 -> blocks 2..3; chunk blocks 0..1
    np.testing.assert_array_equal(b[1], [2, 4, 0, 2])
    # padding rows: empty ranges
    assert b[2][0] == b[2][1] and b[2][2] == b[2][3] and b[3][1] == 0 and b[3][3] == 0


def test_cache_backend_choice(monkeypatch):
    assert all(choose_cache_backend(c) == "xla" for c in (1, 64, 4096))  # CPU: nothing changes
    monkeypatch.setattr(_compat, "sm80_gpu", lambda: True)
    assert choose_cache_backend(1) == "pallas_gpu"  # decode: the split-ring kernel
    assert choose_cache_backend(2) == "xla" and choose_cache_backend(PALLAS_CACHE_MIN_CHUNK - 1) == "xla"
    assert choose_cache_backend(PALLAS_CACHE_MIN_CHUNK) == "pallas_gpu" and choose_cache_backend(4096) == "pallas_gpu"
    monkeypatch.setattr(_compat, "sm80_gpu", lambda: False)  # a GPU older than sm80, or none
    assert choose_cache_backend(4096) == "xla"


@pytest.mark.parametrize("chosen,expected", [("cudnn", "auto"), ("mosaic_gpu", "auto"), ("xla", "xla"),
                                             ("pallas_gpu", "pallas_gpu"), ("auto", "auto")])
def test_cache_path_maps_kernels_without_a_cache_form(chosen, expected):
    """cuDNN and the Mosaic GPU kernels have no chunk-against-ring form: choosing them for attention leaves the
    cache path (prefill chunks, decode) on its own automatic choice."""
    from infinitevl_jax import ops
    with ops.use_backends(attention=chosen):
        assert ops._cache_backend() == expected


def test_auto_dispatch_uses_the_kernel_for_prefill_chunks(monkeypatch):
    """On an sm80+ GPU, ``attend_to_cache(backend="auto")`` traces the chunk kernel for a 64-query chunk, the decode
    kernel for one query and XLA in between."""
    monkeypatch.setattr(_compat, "sm80_gpu", lambda: True)
    sd = jax.ShapeDtypeStruct

    def jaxpr(c):
        args = (sd((1, c, 4, 16), jnp.bfloat16), sd((1, c, 2, 16), jnp.bfloat16), sd((1, c, 2, 16), jnp.bfloat16),
                sd((1, 99, 2, 16), jnp.bfloat16), sd((1, 99, 2, 16), jnp.bfloat16), sd((1, 99), jnp.int32),
                sd((1, c), jnp.int32))
        return str(jax.make_jaxpr(lambda *a: attend_to_cache(*a, window=100))(*args))

    assert "swa_attend_to_cache" in jaxpr(PALLAS_CACHE_MIN_CHUNK)
    assert "swa_decode" in jaxpr(1)
    assert "pallas_call" not in jaxpr(2)


@pytest.mark.parametrize("chunk", [64, 4096])
def test_pallas_cache_kernel_gpu_lowering(chunk):
    """Lowers to Triton IR at InfiniteVL's SWA shape (Hq 16, Hkv 2, D 128, ring of 8191, bf16): a lowering, not a
    compilation (shared-memory and register limits are only checked on a GPU)."""
    from pallas_kernels import _compat

    sd = jax.ShapeDtypeStruct
    B, Hq, Hkv, D, L = 1, 16, 2, 128, 8191
    args = (sd((B, chunk, Hq, D), jnp.bfloat16), sd((B, chunk, Hkv, D), jnp.bfloat16),
            sd((B, chunk, Hkv, D), jnp.bfloat16), sd((B, L, Hkv, D), jnp.bfloat16), sd((B, L, Hkv, D), jnp.bfloat16),
            sd((B, L), jnp.int32), sd((B, chunk), jnp.int32))
    with _compat.compiled():
        text = jax.jit(lambda *a: swa_cache.attend_to_cache_pallas(*a, window=8192)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "swa_attend_to_cache" in text


@pytest.mark.parametrize("L", [8191, 524288])
def test_decode_cache_kernel_gpu_lowering(L):
    """The split-ring decode kernel lowers to Triton IR at the SWA layers' ring and at a 512K teacher cache, and
    ``attend_to_cache`` sends one-query chunks to it on a GPU."""
    from pallas_kernels import _compat

    sd = jax.ShapeDtypeStruct
    B, Hq, Hkv, D = 1, 16, 2, 128
    args = (sd((B, 1, Hq, D), jnp.bfloat16), sd((B, 1, Hkv, D), jnp.bfloat16), sd((B, 1, Hkv, D), jnp.bfloat16),
            sd((B, L, Hkv, D), jnp.bfloat16), sd((B, L, Hkv, D), jnp.bfloat16), sd((B, L), jnp.int32),
            sd((B, 1), jnp.int32))
    with _compat.compiled():
        text = jax.jit(lambda *a: attend_to_cache(*a, window=8192 if L < 8192 else None, backend="pallas_gpu")).trace(
            *args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "swa_decode" in text


def test_decode_attend_and_write_gpu_lowering():
    """The decode step's kernel pair (split ring, then combine-and-write) lowers to Triton IR at the SWA layers'
    shape, one row padded to two, the donated ring aliased in place."""
    from pallas_kernels import _compat
    from pallas_kernels.sliding_window_attention import attend_to_cache_and_write

    sd = jax.ShapeDtypeStruct
    B, Hq, Hkv, D, L = 1, 16, 2, 128, 8191
    args = (sd((B, 1, Hq, D), jnp.bfloat16), sd((B, 1, Hkv, D), jnp.bfloat16), sd((B, 1, Hkv, D), jnp.bfloat16),
            sd((B, L, Hkv, D), jnp.bfloat16), sd((B, L, Hkv, D), jnp.bfloat16), sd((B, L), jnp.int32),
            sd((B, 1), jnp.int32))
    f = lambda *a: attend_to_cache_and_write(*a, window=8192, out_rows=2, backend="pallas_gpu")
    with _compat.compiled():
        text = jax.jit(f, donate_argnums=(3, 4, 5)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and "swa_decode_combine" in text
    assert text.count("tf.aliasing_output") == 3


# ----------------------------------------------------------------------------- residual add + RMSNorm (decode)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 1, 256), (5, 128)])
def test_add_rms_norm_kernel_equals_reference(shape, dtype):
    """The kernel (interpret mode; compiled on a GPU) against the reference on fresh inputs: the new residual bit for
    bit, the normalised rows to the float32 sum's order (on CPU bit for bit too: same roundings in the same order)."""
    from pallas_kernels import rms_norm

    ks = jax.random.split(jax.random.key(zlib.crc32(repr((shape, dtype)).encode())), 3)
    x = (3.0 * jax.random.normal(ks[0], shape)).astype(dtype)
    d = jax.random.normal(ks[1], shape, dtype)
    w = (1.0 + 0.1 * jax.random.normal(ks[2], shape[-1:])).astype(dtype)
    got = rms_norm.add_rms_norm(x, d, w, 1e-6, backend="pallas_gpu")
    want = rms_norm.add_rms_norm_reference(x, d, w, 1e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    assert rel(got[1], want[1]) <= (1e-6 if dtype == jnp.float32 else 4e-3)
    s, h = want  # the reference is the definition: x + d, then scale * s / rms(s)
    s32 = np.asarray(x, np.float64) + np.asarray(d, np.float64)
    ref_h = np.asarray(w, np.float64) * s32 / np.sqrt(np.mean(s32 ** 2, axis=-1, keepdims=True) + 1e-6)
    assert rel(h, ref_h) <= (1e-6 if dtype == jnp.float32 else 1e-2)


def test_add_rms_norm_backends_and_errors(monkeypatch):
    from pallas_kernels import _compat, rms_norm

    x = jnp.ones((2, 1, 64))
    with pytest.raises(ValueError, match="same shape"):
        rms_norm.add_rms_norm(x, jnp.ones((1, 1, 64)), jnp.ones(64), 1e-6)
    with pytest.raises(ValueError, match=r"scale must be \[64\]"):
        rms_norm.add_rms_norm(x, x, jnp.ones(32), 1e-6)
    with pytest.raises(ValueError, match="does not support rows of 96"):
        rms_norm.resolve_backend("pallas_gpu", 2, 96)
    with pytest.raises(ValueError, match="backend must be one of"):
        rms_norm.resolve_backend("cudnn", 2, 64)
    monkeypatch.setattr(_compat, "sm80_gpu", lambda: True)
    assert rms_norm.resolve_backend("auto", 2, 2048) == "pallas_gpu"
    assert rms_norm.resolve_backend("auto", rms_norm.MAX_KERNEL_ROWS + 1, 2048) == "xla"  # prefill rows: XLA
    assert rms_norm.resolve_backend("auto", 2, 96) == "xla"
    monkeypatch.setattr(_compat, "sm80_gpu", lambda: False)
    assert rms_norm.resolve_backend("auto", 2, 2048) == "xla"
    s, h = rms_norm.add_rms_norm(x.astype(jnp.bfloat16), x, jnp.ones(64), 1e-6, backend="pallas_gpu")
    assert s.dtype == h.dtype == jnp.float32  # mixed dtypes: the reference's promotion, not the kernel's cast


def test_add_rms_norm_gpu_lowering():
    """The kernel through the Pallas Triton lowering at the 4B decode shape (two rows of 2048, bf16): one call."""
    from pallas_kernels import _compat, rms_norm

    sd = jax.ShapeDtypeStruct
    args = (sd((2, 1, 2048), jnp.bfloat16), sd((2, 1, 2048), jnp.bfloat16), sd((2048,), jnp.bfloat16))
    with _compat.compiled():
        text = jax.jit(lambda x, d, w: rms_norm.add_rms_norm_gpu(x, d, w, 1e-6)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and "add_rms_norm" in text
