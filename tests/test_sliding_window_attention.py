"""Sliding-window attention: every backend against the dense masked reference (CPU, Pallas
kernels in interpret mode), the TPU lowering at the model's shape, and the ring-buffer cache."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sliding_window_attention import (
    attend_to_cache,
    attend_to_cache_reference,
    attend_to_cache_xla,
    attention_blockwise,
    attention_reference,
    choose_backend,
    init_ring_buffer,
    ring_buffer_write,
    sliding_window_attention,
)
from pallas_kernels.sliding_window_attention.cache import (attend_to_cache_decode_pallas, attend_to_cache_pallas,
                                                           decode_attend_and_write_pallas,
                                                           decode_attend_and_write_rotary_pallas,
                                                           rotary_decode_supported)
from pallas_kernels.sliding_window_attention import flash_mosaic
from pallas_kernels.sliding_window_attention.flash_gpu import flash_attention
from pallas_kernels.sliding_window_attention.splash_tpu import splash_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# small blocks so that tiny sequences still cover edge, interior and diagonal blocks
FLASH_BLOCKS = dict(block_q=16, block_k=8, bwd_block_q=8, bwd_block_k=16, interpret=True)


def rel(a, b, scale=None):
  """||a - b|| / ||b||; where b is exactly zero (window 1: softmax over one key has zero q/k
  gradients) the error is measured against ``scale`` (the cotangent's norm) instead."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b)
  if den == 0.0 and scale is not None:
    den = float(np.linalg.norm(np.asarray(scale, np.float64)))
  return float(np.linalg.norm(a - b) / den)


def draw(name, b, t, hq, hkv, d, dtype=jnp.float32, packed=False):
  """Fresh random q, k, v, dO (and segment ids when packed), seeded by the case name."""
  key = jax.random.PRNGKey(zlib.crc32(name.encode()))
  kq, kk, kv, kd, ks = jax.random.split(key, 5)
  q = jax.random.normal(kq, (b, t, hq, d), dtype)
  k = jax.random.normal(kk, (b, t, hkv, d), dtype)
  v = jax.random.normal(kv, (b, t, hkv, d), dtype)
  do = jax.random.normal(kd, (b, t, hq, d), dtype)
  seg = None
  if packed:  # sorted random document ids: 1-4 documents of random lengths per row
    seg = jnp.sort(jax.random.randint(ks, (b, t), 0, 4), axis=1).astype(jnp.int32)
  return q, k, v, do, seg


def naive(q, k, v, window, seg):
  """Loop-by-loop float64 attention, independent of the reference's masking code."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for ti in range(t):
      keys = [s for s in range(t) if s <= ti and (window is None or s > ti - window)
              and (seg is None or seg[bi, s] == seg[bi, ti])]
      for h in range(hq):
        logits = np.array([q[bi, ti, h] @ k[bi, s, h // g] for s in keys]) * d ** -0.5
        p = np.exp(logits - logits.max())
        out[bi, ti, h] = (p / p.sum()) @ v[bi, keys, h // g]
  return out


def check_against_reference(fn, case, b, t, hq, hkv, d, window, packed, dtype=jnp.float32):
  q, k, v, do, seg = draw(case, b, t, hq, hkv, d, dtype, packed)
  f32 = lambda x: x.astype(jnp.float32)
  ref = functools.partial(attention_reference, window=window, segment_ids=seg)
  o_ref, vjp_ref = jax.vjp(ref, f32(q), f32(k), f32(v))
  o, vjp = jax.vjp(functools.partial(fn, window=window, segment_ids=seg), q, k, v)
  assert o.dtype == q.dtype and o.shape == q.shape
  errs = [rel(o, o_ref)] + [rel(a, b_, do) for a, b_ in zip(vjp(do), vjp_ref(f32(do)))]
  assert max(errs) <= TOL[dtype], dict(zip(("o", "dq", "dk", "dv"), errs))


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("window,packed", [(3, False), (100, False), (None, True), (5, True)])
def test_reference_matches_loops(window, packed):
  q, k, v, _, seg = draw(f"naive{window}{packed}", 2, 13, 4, 2, 8, packed=packed)
  o = attention_reference(q, k, v, window=window, segment_ids=seg)
  assert rel(o, naive(q, k, v, window, None if seg is None else np.asarray(seg))) < 1e-6


def test_window_one_is_identity_on_values():
  q, k, v, _, _ = draw("w1", 1, 9, 4, 2, 8)
  o = attention_reference(q, k, v, window=1)
  np.testing.assert_allclose(o, jnp.repeat(v, 2, axis=2), rtol=1e-6)


@pytest.mark.parametrize("attend", [attend_to_cache_reference, attend_to_cache_xla], ids=["reference", "xla"])
def test_row_without_keys_is_finite(attend):
  # a query row that sees nothing (only possible through the cache path) must give zeros
  q, k, v, _, _ = draw("empty", 1, 1, 2, 1, 8)
  pos = jnp.array([[-1]], jnp.int32)
  cache_k, cache_v, cache_pos = init_ring_buffer(1, 4, 1, 8, jnp.float32)
  o = attend(q, k, v, cache_k, cache_v, cache_pos, pos, window=4)
  assert np.all(np.asarray(o) == 0.0)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_cache_xla_matches_reference_on_a_partly_filled_ring(dtype, tol):
  # one decode query and a 3-token chunk against a ring holding stale, valid and empty slots
  b, L, hq, hkv, d = 2, 9, 4, 2, 16
  ks = jax.random.split(jax.random.key(7), 5)
  ck, cv = (jax.random.normal(x, (b, L, hkv, d), dtype) for x in ks[:2])
  cpos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, -1, -1], [9, 10, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  for c, qpos in ((1, [[7], [11]]), (3, [[7, 8, -1], [11, 12, 13]])):
    q = jax.random.normal(ks[2], (b, c, hq, d), dtype)
    k, v = (jax.random.normal(x, (b, c, hkv, d), dtype) for x in ks[3:5])
    qpos = jnp.asarray(qpos, jnp.int32)
    for window in (5, None):
      want = attend_to_cache_reference(q, k, v, ck, cv, cpos, qpos, window=window)
      got = attend_to_cache_xla(q, k, v, ck, cv, cpos, qpos, window=window)
      assert rel(got, want) <= tol


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("L,block_k,splits,window", [(9, 4, 2, 5), (9, 4, 8, None), (99, 16, 4, 60), (99, 16, 64, 100),
                                                     (5, 16, 4, 6)])
def test_decode_kernel_matches_reference(dtype, tol, L, block_k, splits, window):
  """The split-ring decode kernel (interpret mode): a ring holding stale, valid and empty slots, rings that are not
  a multiple of the block (the shifted last block), more splits than blocks, a padding query (zeros), 4 query
  heads per kv head."""
  b, hq, hkv, d = 3, 8, 2, 16
  ks = jax.random.split(jax.random.key(L * block_k + splits), 5)
  ck, cv = (jax.random.normal(x, (b, L, hkv, d), dtype) for x in ks[:2])
  newest = 2 * L + 3
  slots = np.arange(L)
  full = newest - 1 - (newest - 1 - slots) % L  # a ring that wrapped: slot i holds the latest position = i mod L
  partial = np.where(slots < L // 2, slots, -1)  # half filled
  cpos = jnp.asarray(np.stack([full, partial, full]), jnp.int32)
  qpos = jnp.asarray([[newest], [L // 2], [-1]], jnp.int32)
  q = jax.random.normal(ks[2], (b, 1, hq, d), dtype)
  k, v = (jax.random.normal(x, (b, 1, hkv, d), dtype) for x in ks[3:5])
  want = attend_to_cache_reference(q, k, v, ck, cv, cpos, qpos, window=window)
  got = attend_to_cache_decode_pallas(q, k, v, ck, cv, cpos, qpos, window=window, block_k=block_k, splits=splits,
                                      interpret=True)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert rel(got, want) <= tol, rel(got, want)
  assert np.all(np.asarray(got[2]) == 0.0)
  with pytest.raises(ValueError, match="one query per row"):
    attend_to_cache_decode_pallas(jnp.concatenate([q, q], 1), jnp.concatenate([k, k], 1),
                                  jnp.concatenate([v, v], 1), ck, cv, cpos, jnp.concatenate([qpos, qpos], 1),
                                  window=window, interpret=True)


@pytest.mark.parametrize("window", [11])
def test_blockwise_matches_dense(window):
  check_against_reference(functools.partial(attention_blockwise, block_q=8), f"bw{window}",
                          2, 29, 4, 2, 8, window, packed=True)


# ----------------------------------------------------------------------------- Pallas GPU


@pytest.mark.parametrize(
    "b,t,hq,hkv,window,packed,dtype",
    [
        (1, 45, 8, 1, 9, True, jnp.float32),       # Hq/Hkv = 8, window < T, T % block != 0
        (1, 24, 4, 2, 100, False, jnp.bfloat16),   # Hq/Hkv = 2, window > T
    ])
def test_flash_gpu_interpret(b, t, hq, hkv, window, packed, dtype):
  check_against_reference(functools.partial(flash_attention, **FLASH_BLOCKS),
                          f"flash{t}{window}", b, t, hq, hkv, 16, window, packed, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("t", [37, 64])
@pytest.mark.parametrize("window", [1, 17, None])
@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_gpu_interpret_grid(t, window, hq, hkv, packed):
  dtype = jnp.bfloat16 if packed else jnp.float32
  check_against_reference(functools.partial(flash_attention, **FLASH_BLOCKS),
                          f"flashgrid{t}{window}{hq}{packed}", 2, t, hq, hkv, 16, window, packed,
                          dtype)


# ----------------------------------------------------------------------------- splash (TPU)


@pytest.mark.parametrize("t,hq,hkv,window,packed", [(200, 8, 1, 70, True)])
def test_splash_interpret(t, hq, hkv, window, packed):
  check_against_reference(functools.partial(splash_attention, interpret=True),
                          f"splash{t}{window}", 1, t, hq, hkv, 16, window, packed)


@pytest.mark.slow
@pytest.mark.parametrize("t", [128, 300])
@pytest.mark.parametrize("window", [1, 50, None])
@pytest.mark.parametrize("packed", [False, True])
def test_splash_interpret_grid(t, window, packed):
  dtype = jnp.bfloat16 if packed else jnp.float32
  check_against_reference(functools.partial(splash_attention, interpret=True),
                          f"splashgrid{t}{window}{packed}", 2, t, 8, 2, 16, window, packed, dtype)


def _jaxpr_text(fn, *args):
  return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_pallas_call_in_forward_and_backward(backend):
  q, k, v, _, seg = draw("jaxpr", 1, 256, 4, 2, 16, packed=True)
  f = functools.partial(sliding_window_attention, window=64, segment_ids=seg, backend=backend)
  fwd = _jaxpr_text(f, q, k, v)
  bwd = _jaxpr_text(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)), q, k, v)
  assert "pallas_call" in fwd
  # the backward jaxpr holds the forward and the backward kernels
  assert bwd.count("pallas_call") >= 2


def test_tpu_lowering_at_model_shape():
  """Splash lowers for TPU at Hq=16, Hkv=2, D=128, W=8192, T=16384 (nothing is allocated)."""
  b, t, hq, hkv, d = 1, 16384, 16, 2, 128
  q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  f = functools.partial(sliding_window_attention, window=8192, backend="pallas_tpu")
  fwd = jax.jit(lambda q, k, v, s: f(q, k, v, segment_ids=s))
  text = fwd.trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
  loss = lambda q, k, v, s: f(q, k, v, segment_ids=s).astype(jnp.float32).sum()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = bwd.trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") >= 2


def _mosaic_calls(text):
  return text.count("custom_call @mosaic_gpu")


def test_mosaic_gpu_lowering_at_model_shape():
  """The Mosaic GPU forward and backward lower for CUDA at Hq=16, Hkv=2, D=128, W=8192, T=16384: tracing, Mosaic's
  layout inference and its shared-memory budget all run on the CPU host (nothing is compiled to PTX or run)."""
  b, t, hq, hkv, d = 1, 16384, 16, 2, 128
  q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
  f = functools.partial(sliding_window_attention, window=8192, backend="mosaic_gpu")
  text = jax.jit(f).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 1
  loss = lambda q, k, v: f(q, k, v).astype(jnp.float32).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  assert _mosaic_calls(text) == 2  # the forward and the one backward kernel
  assert "__gpu$xla.gpu.triton" not in text  # no Triton kernel left in the backward


def test_mosaic_gpu_rejects_bad_input():
  q, k, v, _, seg = draw("mosaic_bad", 1, 256, 4, 2, 64, dtype=jnp.bfloat16, packed=True)
  with pytest.raises(ValueError, match="segment_ids"):
    flash_mosaic.flash_attention(q, k, v, window=64, segment_ids=seg)
  with pytest.raises(ValueError, match="16-bit"):
    flash_mosaic.flash_attention(q.astype(jnp.float32), k, v, window=64)
  with pytest.raises(ValueError, match="multiples of 64"):
    flash_mosaic.flash_attention(q[..., :32], k[..., :32], v[..., :32], window=64)
  with pytest.raises(ValueError, match="Hkv"):
    flash_mosaic.flash_attention(q[:, :, :3], k, v, window=64)
  with pytest.raises(ValueError, match="backward"):
    flash_mosaic.flash_attention(q, k, v, window=64, backward="nope")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_mosaic.supported(), reason="needs an NVIDIA Hopper (sm90) GPU")
@pytest.mark.parametrize("b,t,window", [(1, 4096, 1024), (2, 4000, 700), (1, 1000, None), (1, 512, 8192)])
@pytest.mark.parametrize("backward", ["mosaic", "triton"])
def test_mosaic_gpu_compiled(b, t, window, backward):
  """Compiled on the GPU, bf16 at the model's head shape, against the float32 reference: output and gradients."""
  q, k, v, do, _ = draw(f"mosaic{b}{t}{window}", b, t, 16, 2, 128, dtype=jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  ref, vjp_ref = jax.vjp(lambda *a: attention_reference(*a, window=window), f32(q), f32(k), f32(v))
  fn = jax.jit(functools.partial(flash_mosaic.flash_attention, window=window, backward=backward))
  out, vjp = jax.vjp(fn, q, k, v)
  for got, want in zip((out, *vjp(do)), (ref, *vjp_ref(f32(do)))):
    assert rel(f32(got), want) < TOL[jnp.bfloat16]


# ----------------------------------------------------------------------------- dispatch


def test_dispatch():
  q, k, v, _, seg = draw("dispatch", 1, 16, 4, 2, 8, packed=True)
  assert choose_backend() == "xla"  # CPU
  a = sliding_window_attention(q, k, v, window=5, segment_ids=seg)
  b = attention_reference(q, k, v, window=5, segment_ids=seg)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="segment_ids"):
    sliding_window_attention(q, k, v, window=5, segment_ids=seg, backend="cudnn")
  with pytest.raises(ValueError, match="unknown backend"):
    sliding_window_attention(q, k, v, window=5, backend="nope")


# ----------------------------------------------------------------------------- cache


def test_ring_buffer_write_rules():
  ck, cv, cpos = init_ring_buffer(2, 4, 1, 2, jnp.float32)
  k = jnp.arange(2 * 6 * 2, dtype=jnp.float32).reshape(2, 6, 1, 2)
  pos = jnp.array([[0, 1, 2, 3, 4, 5], [7, 8, -1, -1, -1, -1]], jnp.int32)
  ck, cv, cpos = ring_buffer_write(ck, cv, cpos, k, k, pos)
  # row 0: six tokens into four slots, the last four win; row 1: padding writes nothing
  np.testing.assert_array_equal(cpos, [[4, 5, 2, 3], [8, -1, -1, 7]])
  np.testing.assert_array_equal(ck[0, :, 0, 0], k[0, [4, 5, 2, 3], 0, 0])
  np.testing.assert_array_equal(ck[1, [3, 0], 0, 0], k[1, [0, 1], 0, 0])
  np.testing.assert_array_equal(ck[1, [1, 2]], 0.0)


def run_chunks(attend, q, k, v, window, length, chunk):
  """Feed a sequence through attend + ring_buffer_write chunk by chunk (last chunk padded)."""
  b, t, _, d = q.shape
  cache = init_ring_buffer(b, length, k.shape[2], d, jnp.float32)

  @jax.jit
  def step(cache, qc, kc, vc, pos):
    o = attend(qc, kc, vc, *cache, pos, window=window)
    return o, ring_buffer_write(*cache, kc, vc, pos)

  outs = []
  for s in range(0, t, chunk):
    n = min(chunk, t - s)
    pad = lambda x: jnp.pad(x[:, s:s + n], ((0, 0), (0, chunk - n), (0, 0), (0, 0)))
    pos = jnp.where(jnp.arange(chunk) < n, s + jnp.arange(chunk), -1).astype(jnp.int32)
    o, cache = step(cache, pad(q), pad(k), pad(v), jnp.broadcast_to(pos, (b, chunk)))
    assert np.all(np.isfinite(np.asarray(o)))  # padding rows included
    outs.append(o[:, :n])
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("chunk,impl", [(c, i) for c in (1, 7, 64) for i in ("reference", "xla", "pallas")]
                         + [(1, "pallas_decode")])
def test_chunked_cache_equals_full_sequence(chunk, impl):
  window, t = 6, 70  # buffer of 5 slots: 14 full wraps; two chunks of 64
  attend = {"reference": attend_to_cache_reference, "xla": attend_to_cache_xla,
            "pallas": functools.partial(attend_to_cache_pallas, block_k=16, interpret=True),
            "pallas_decode": functools.partial(attend_to_cache_decode_pallas, block_k=16, interpret=True)}[impl]
  q, k, v, _, _ = draw(f"cache{chunk}{impl}", 2, t, 4, 2, 8)
  full = attention_reference(q, k, v, window=window)
  assert rel(run_chunks(attend, q, k, v, window, window - 1, chunk), full) <= 1e-5


@pytest.mark.parametrize("block_k,out_rows", [(4, 2), (4, 4), (16, 3)])
def test_decode_attend_and_write_equals_separate_steps(block_k, out_rows):
  """Token by token through a 5-slot ring (14 full wraps), the fused decode step (split-ring kernel, then the
  combine kernel writing the new key/value/position in place; interpret mode) equals ``attend_to_cache`` followed by
  ``ring_buffer_write``: outputs, zero rows past B (and for the padding query of row 1 at every third step), and the
  ring itself. A block larger than the ring takes the separate steps (block_k 16)."""
  window, t, b = 6, 70, 2
  q, k, v, _, _ = draw("fusedwrite", b, t, 4, 2, 8)
  ref_cache = init_ring_buffer(b, window - 1, 2, 8, jnp.float32)
  cache = ref_cache
  fused = jax.jit(lambda *a: decode_attend_and_write_pallas(*a, window=window, out_rows=out_rows, block_k=block_k,
                                                            splits=2, interpret=True))
  separate = jax.jit(lambda qc, kc, vc, cache, pos: (attend_to_cache_reference(qc, kc, vc, *cache, pos, window=window),
                                                      ring_buffer_write(*cache, kc, vc, pos)))
  for i in range(t):
    pos = jnp.asarray([[i], [i // 3 if i % 3 else -1]], jnp.int32)  # row 1: a slower stream with padding steps
    sl = lambda x: x[:, i:i + 1]
    o, *cache = fused(sl(q), sl(k), sl(v), *cache, pos)
    o_ref, ref_cache = separate(sl(q), sl(k), sl(v), ref_cache, pos)
    assert o.shape == (out_rows, 4, 8)
    assert rel(o[:b], o_ref[:, 0]) <= 1e-5, (i, rel(o[:b], o_ref[:, 0]))
    assert not np.any(np.asarray(o[b:]))
    if i % 3 == 0:
      assert not np.any(np.asarray(o[1]))
    for a, r in zip(cache, ref_cache):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


def _rotate_half_reference(x, cos, sin):
  """The rotate-half rotary embedding of ``x [B, H, D]`` with ``cos, sin [B, D]`` in float32, rounded to x's dtype."""
  x32 = x.astype(jnp.float32)
  h = x.shape[-1] // 2
  rot = jnp.concatenate([-x32[..., h:], x32[..., :h]], axis=-1)
  return (x32 * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


@pytest.mark.parametrize("hq,hkv,dtype,out_rows", [(16, 2, jnp.float32, 2), (16, 4, jnp.float32, 3),
                                                   (32, 2, jnp.float32, 2), (16, 2, jnp.bfloat16, 2)])
def test_rotary_decode_equals_rotating_first(hq, hkv, dtype, out_rows):
  """Token by token through an 8-slot ring (5 full wraps, a padding query in row 1 every third step), the decode
  kernels fed the fused unrotated projection and the rotary cos / sin (interpret mode) equal rotating q and k first
  and taking ``decode_attend_and_write_pallas``: outputs and the ring itself (rows past B of the projection and of
  the output are padding)."""
  window, t, b, d = 9, 45, 2, 32
  key = jax.random.PRNGKey(zlib.crc32(f"rotary{hq}{hkv}{dtype}".encode()))
  kx, ka = jax.random.split(key)
  qkv = jax.random.normal(kx, (t, out_rows, (hq + 2 * hkv) * d), jnp.float32).astype(dtype)
  angles = jax.random.uniform(ka, (t, b, d // 2), jnp.float32, 0.0, 6.3)
  cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
  assert rotary_decode_supported(hq, hkv, d, window - 1, 4)
  fused = jax.jit(lambda *a: decode_attend_and_write_rotary_pallas(*a, num_heads=hq, window=window, out_rows=out_rows,
                                                                    block_k=4, splits=2, interpret=True))

  def first_rotate(x, c, s_, ck, cv, cp, pos):
    heads = x[:b].reshape(b, hq + 2 * hkv, d)
    q = _rotate_half_reference(heads[:, :hq], c, s_)
    k = _rotate_half_reference(heads[:, hq:hq + hkv], c, s_)
    return decode_attend_and_write_pallas(q[:, None], k[:, None], heads[:, None, hq + hkv:], ck, cv, cp, pos,
                                          window=window, out_rows=out_rows, block_k=4, splits=2, interpret=True)

  separate = jax.jit(first_rotate)
  cache = ref_cache = init_ring_buffer(b, window - 1, hkv, d, dtype)
  for i in range(t):
    pos = jnp.asarray([[i], [i // 3 if i % 3 else -1]], jnp.int32)
    o, *cache = fused(qkv[i], cos[i], sin[i], *cache, pos)
    o_ref, *ref_cache = separate(qkv[i], cos[i], sin[i], *ref_cache, pos)
    assert o.shape == (out_rows, hq, d) and o.dtype == dtype
    assert rel(o[:b], o_ref[:b]) <= (1e-5 if dtype == jnp.float32 else 2e-2), (i, rel(o[:b], o_ref[:b]))
    assert not np.any(np.asarray(o[b:]))
    for a, r in zip(cache, ref_cache):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("b", [1, 3])
def test_rotary_decode_compiled_on_gpu(b):
  """The compiled kernels at the 4B attention shape (16 query heads, 2 key/value heads of 128, an 8191-slot ring,
  bf16): bit-identical to rotating q and k first, ring included; row b - 1 of the batch of 3 is a padding query."""
  hq, hkv, d, length = 16, 2, 128, 8191
  ks = jax.random.split(jax.random.PRNGKey(b), 4)
  ring = (jax.random.normal(ks[0], (b, length, hkv, d), jnp.bfloat16),
          jax.random.normal(ks[1], (b, length, hkv, d), jnp.bfloat16),
          jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length)))
  rows = max(b, 2)
  qkv = jax.random.normal(ks[2], (rows, (hq + 2 * hkv) * d), jnp.bfloat16)
  angles = jax.random.uniform(ks[3], (b, d // 2), jnp.float32, 0.0, 6.3)
  cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
  pos = (length + 5 - 3 * jnp.arange(b, dtype=jnp.int32))[:, None]
  if b > 2:
    pos = pos.at[b - 1].set(-1)

  @jax.jit
  def first_rotate(qkv, ck, cv, cp):
    heads = qkv[:b].reshape(b, hq + 2 * hkv, d)
    q = _rotate_half_reference(heads[:, :hq], cos, sin)
    k = _rotate_half_reference(heads[:, hq:hq + hkv], cos, sin)
    return decode_attend_and_write_pallas(q[:, None], k[:, None], heads[:, None, hq + hkv:], ck, cv, cp, pos,
                                          window=8192, out_rows=rows)

  fused = jax.jit(lambda qkv, ck, cv, cp: decode_attend_and_write_rotary_pallas(
      qkv, cos, sin, ck, cv, cp, pos, num_heads=hq, window=8192, out_rows=rows))
  for a, r in zip(fused(qkv, *ring), first_rotate(qkv, *ring)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(r.astype(jnp.float32)))


def test_rotary_decode_shape_checks():
  assert not rotary_decode_supported(4, 2, 32, 100)  # fewer query heads than one block of rows
  assert not rotary_decode_supported(24, 2, 32, 100)  # 12 heads per group: not a power of two
  assert not rotary_decode_supported(16, 2, 16, 100)  # halves of 8: narrower than a dot operand
  assert not rotary_decode_supported(16, 2, 32, 10)  # ring shorter than one key block
  assert rotary_decode_supported(16, 2, 128, 8191)
  ring = init_ring_buffer(1, 64, 2, 32, jnp.float32)
  cs = jnp.zeros((1, 32))
  with pytest.raises(ValueError, match="qkv must be"):
    decode_attend_and_write_rotary_pallas(jnp.zeros((1, 16 * 32)), cs, cs, *ring, jnp.zeros((1, 1), jnp.int32),
                                          num_heads=16, window=None)
  with pytest.raises(ValueError, match="does not take"):
    decode_attend_and_write_rotary_pallas(jnp.zeros((1, 8 * 32)), cs, cs, *ring, jnp.zeros((1, 1), jnp.int32),
                                          num_heads=4, window=None)


def test_full_attention_cache_and_dispatch():
  t = 20
  q, k, v, _, _ = draw("cachefull", 1, t, 4, 1, 8)
  full = attention_reference(q, k, v, window=None)
  assert rel(run_chunks(attend_to_cache, q, k, v, None, 24, 7), full) <= 1e-5
