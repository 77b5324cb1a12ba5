"""Gated delta rule: every backend against the float32 token recurrence (norm-relative errors).

The default run is a small covering subset; `-m slow` runs the full grid of issue 4
(T in {1, 63, 64, 65, 300} x initial state x segment resets x gate regimes, forward and gradients).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule,
                                             naive_recurrent_gated_delta_rule)

ARGNAMES = ("q", "k", "v", "g", "beta", "initial_state")


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(seed, B, T, H, K, V, *, gate="mixed", resets=True, init=True, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  a = jax.random.normal(ks[3], (B, T, H))
  g = {"near0": -0.01 * jax.nn.sigmoid(a), "strong": -2.0 - 3.0 * jax.nn.sigmoid(a),
       "mixed": -jax.nn.softplus(a)}[gate]
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
  h0 = jax.random.normal(ks[5], (B, H, K, V)) if init else None
  seg = None
  if resets:  # several resets per 64-token chunk, at arbitrary positions, and one at t = 1
    r = (jax.random.uniform(ks[6], (B, T)) < 0.06).at[:, min(1, T - 1)].set(True)
    seg = jnp.cumsum(r, axis=1).astype(jnp.int32)
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), g=g.astype(jnp.float32), beta=cast(beta),
              initial_state=h0, segment_ids=seg)


def run(fn, x, **kw):
  return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
            segment_ids=x["segment_ids"], **kw)


def check_forward(backend, x, tol, **kw):
  o, s = jax.jit(functools.partial(run, chunk_gated_delta_rule, backend=backend, **kw))(x)
  f32 = {n: (a.astype(jnp.float32) if a is not None and n != "segment_ids" else a) for n, a in x.items()}
  o_ref, s_ref = run(naive_recurrent_gated_delta_rule, f32, **kw)
  assert o.shape == o_ref.shape and o.dtype == x["v"].dtype
  assert rel(o, o_ref) <= tol, rel(o, o_ref)
  assert rel(s, s_ref) <= tol, rel(s, s_ref)


def check_grads(backend, x, tol=1e-4, **kw):
  names = [n for n in ARGNAMES if x[n] is not None]

  def loss(fn, *args):
    y = dict(x, **dict(zip(names, args)))
    o, s = run(fn, y, **kw)
    # non-trivial cotangents on both outputs
    return jnp.sum(o * jnp.sin(o + 1.0)) + jnp.sum(s * jnp.cos(s))

  args = [x[n] for n in names]
  got = jax.jit(jax.grad(functools.partial(loss, functools.partial(chunk_gated_delta_rule, backend=backend)),
                         argnums=tuple(range(len(args)))))(*args)
  want = jax.grad(functools.partial(loss, naive_recurrent_gated_delta_rule), argnums=tuple(range(len(args))))(*args)
  for n, a, b in zip(names, got, want):
    assert rel(a, b) <= tol, (n, rel(a, b))


# ---------------------------------------------------------------- default (CI) subset

def test_xla_forward_and_grads():
  x = make_inputs(0, 2, 150, 2, 32, 16)
  check_forward("xla", x, 1e-5)
  check_grads("xla", x)


def test_signature_defaults():
  x = make_inputs(1, 1, 65, 2, 16, 16, resets=False, init=False)
  o, s = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], backend="xla")
  assert s is None and o.shape == (1, 65, 2, 16)
  o_ref, _ = naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"])
  assert rel(o, o_ref) <= 1e-5
  o2, s2 = fused_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True)
  assert rel(o2, o_ref) <= 1e-6 and s2.shape == (1, 2, 16, 16)


def test_reset_equals_separate_sequences():
  """A reset makes the second document independent of the first (and of the initial state)."""
  x = make_inputs(2, 1, 100, 1, 16, 16, resets=False)
  seg = jnp.where(jnp.arange(100) < 37, 3, 7)[None]  # ids need not be consecutive
  o, _ = chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"],
                                segment_ids=seg, backend="xla")
  o2, _ = chunk_gated_delta_rule(*(x[n][:, 37:] for n in ("q", "k", "v", "g", "beta")), backend="xla")
  assert rel(o[:, 37:], o2) <= 1e-5


# ---------------------------------------------------------------- Pallas backends (interpret mode on CPU)

PALLAS = ("pallas_tpu", "pallas_gpu")


@pytest.mark.parametrize("backend", PALLAS)
def test_pallas_forward_and_grads(backend):
  x = make_inputs(3, 1, 130, 2, 32, 16)
  check_forward(backend, x, 1e-5)
  check_grads(backend, x)


def test_gpu_value_blocks(monkeypatch):
  """Several key/value-column blocks per program (the GPU sequential passes split V, the gradient kernel K and V)."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "BV", 16)
  monkeypatch.setattr(pallas_gpu, "GRAD_BK", 16)
  monkeypatch.setattr(pallas_gpu, "GRAD_BV", 16)
  x = make_inputs(6, 1, 70, 1, 32, 32)
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)


def test_gpu_layout_options(monkeypatch):
  """The [B, T, H, *] kernels with B, H > 1, without the q/k L2 norm and with a custom scale."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "NATIVE_LAYOUT", True)
  x = make_inputs(8, 2, 70, 2, 16, 16)
  check_forward("pallas_gpu", x, 1e-5, use_qk_l2norm=False, scale=0.3)
  check_grads("pallas_gpu", x, use_qk_l2norm=False, scale=0.3)


@pytest.mark.parametrize("kernel_norm", [True, False])
def test_gpu_native_layout(monkeypatch, kernel_norm):
  """The [B, T, H, *] kernels with the q/k L2 norm and the scale inside them or in XLA before them; bf16 operands
  stay bf16 in the kernels either way."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "NATIVE_LAYOUT", True)
  monkeypatch.setattr(pallas_gpu, "KERNEL_L2NORM", kernel_norm)
  x = make_inputs(9, 1, 70, 2, 16, 16)
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)
  xb = make_inputs(9, 1, 70, 2, 16, 16, dtype=jnp.bfloat16)
  f = lambda *a: chunk_gated_delta_rule(*a, backend="pallas_gpu")[0]
  jaxpr = jax.make_jaxpr(f)(*(xb[n] for n in ("q", "k", "v", "g", "beta")))

  def pallas_calls(jx):
    for e in jx.eqns:
      if e.primitive.name == "pallas_call":
        yield e
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            yield from pallas_calls(sub)

  calls = list(pallas_calls(jaxpr.jaxpr))
  assert calls and all(v.aval.dtype == jnp.bfloat16 for e in calls for v in e.invars[:2])


@pytest.mark.parametrize("kernel_gates,grad_gates,resets,init", [
    (True, "xla_gam", False, False), (True, "xla_gam", True, False),
    pytest.param(True, "xla_gam", False, True, marks=pytest.mark.slow), (True, "kernel", True, True),
    pytest.param(True, "kernel", False, False, marks=pytest.mark.slow),
    pytest.param(True, "xla", False, False, marks=pytest.mark.slow), (False, "xla", False, False),
    pytest.param(False, "xla", True, True, marks=pytest.mark.slow)])
def test_gpu_kernel_gates(monkeypatch, kernel_gates, grad_gates, resets, init):
  """The within-chunk cumsum of g inside the kernels (or XLA's; for the gradient kernel `GRAD_GATES`), and the
  kernels' stand-ins for absent segment ids (m = 1, seg = 0) and a zero initial state; T not a multiple of the
  chunk, bf16 beta."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "KERNEL_GATES", kernel_gates)
  monkeypatch.setattr(pallas_gpu, "GRAD_GATES", grad_gates)
  monkeypatch.setattr(pallas_gpu, "KERNEL_ZERO_STATE", grad_gates == "kernel")  # both ways of a zero state
  x = make_inputs(10, 1, 100, 2, 16, 16, resets=resets, init=init)
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)
  xb = make_inputs(10, 1, 100, 2, 16, 16, resets=resets, init=init, dtype=jnp.bfloat16)
  check_forward("pallas_gpu", xb, 2e-2)
  # with the kernels forming the gate columns, the forward's only XLA work on g is its padding
  f = lambda *a: run(chunk_gated_delta_rule, dict(xb, **dict(zip("qkv", a))), backend="pallas_gpu")[0]
  jaxpr = str(jax.make_jaxpr(f)(xb["q"], xb["k"], xb["v"]))
  assert ("cumsum" in jaxpr) == (not kernel_gates or resets)


@pytest.mark.parametrize("diag", ["doubling", "substitution", "dense"])
def test_gpu_diag_inverse(monkeypatch, diag):
  """Both ways of inverting prep's [16 x 16] diagonal tiles, and prep on the whole chunk, in float32 (exact products)
  and bf16 (TF32 products), with strongly correlated keys (I + L far from the identity)."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "PREP_DENSE", diag == "dense")  # dense: the whole chunk at once, by doubling
  if diag != "dense":
    monkeypatch.setattr(pallas_gpu, "DIAG_INVERSE", diag)
  x = make_inputs(11, 1, 130, 2, 32, 16)
  x["k"] = x["k"] + 3.0 * jax.random.normal(jax.random.PRNGKey(12), (1, 1, 2, 32))
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)
  xb = {n: (a.astype(jnp.bfloat16) if n in "qkv" else a) for n, a in x.items()}
  check_forward("pallas_gpu", xb, 2e-2)


def test_diag_inverse_doubling():
  """The inverses of a unit lower-triangular matrix against numpy, sizes 2 to 64, entries up to 1."""
  from pallas_kernels.gated_delta_rule import chunk_math as cm
  for n in (2, 4, 16, 64):
    L = jnp.tril(jax.random.uniform(jax.random.PRNGKey(n), (n, n), minval=-1.0, maxval=1.0), -1)
    want = np.linalg.inv(np.eye(n) + np.asarray(L, np.float64))
    assert rel(cm.unit_lower_inverse_doubling(L), want) <= 1e-5
    if n % cm.SUB == 0:  # forward substitution works on SUB-row blocks
      assert rel(cm.unit_lower_inverse(L), want) <= 1e-5


GPU_OLD = {"version1": dict(FUSED_PREP=False), "version2": dict(SPLIT_GRADS=False),
           "version3_xla_layout": dict(NATIVE_LAYOUT=False),
           "version3_kernel_l2norm": dict(NATIVE_LAYOUT=True, KERNEL_L2NORM=True)}


@pytest.mark.slow
@pytest.mark.parametrize("version", GPU_OLD)
def test_gpu_old_versions(monkeypatch, version):
  """The older GPU paths stay correct and selectable (version 1: per-step gates and Q K^T, inverse recomputed in the
  gradient kernel; version 2: gradient kernel with a loop over value blocks carrying [C, K] sums; version 3 on the
  heads-first layout that XLA transposes to, and version 3 with the L2 norm and scale inside the kernels)."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  for name, value in GPU_OLD[version].items():
    monkeypatch.setattr(pallas_gpu, name, value)
  monkeypatch.setattr(pallas_gpu, "BV", 16)
  x = make_inputs(7, 1, 70, 1, 16, 32)
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)


@pytest.mark.parametrize("backend", PALLAS)
def test_pallas_bf16_forward(backend):
  x = make_inputs(4, 1, 65, 1, 32, 32, dtype=jnp.bfloat16)
  check_forward(backend, x, 2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_l2norm", [True, False])
def test_qk_norm_kernel(dtype, use_l2norm):
  """The q/k normalising kernel equals its XLA reference (values and VJP), and falls back to it for rows that do
  not tile."""
  from pallas_kernels.gated_delta_rule import qk_norm
  ks = jax.random.split(jax.random.PRNGKey(12), 4)
  q = (3.0 * jax.random.normal(ks[0], (2, 48, 2, 32))).astype(dtype)
  k = (0.2 * jax.random.normal(ks[1], (2, 48, 2, 32))).astype(dtype)
  out = qk_norm.normalise(q, k, 0.3, use_l2norm)
  ref = qk_norm.reference(q, k, 0.3, use_l2norm)
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  for a, b in zip(out, ref):
    assert a.dtype == dtype and rel(a, b) <= tol
  cts = (jax.random.normal(ks[2], q.shape, dtype), jax.random.normal(ks[3], k.shape, dtype))
  loss = lambda fn: lambda q, k: sum(jnp.sum(x.astype(jnp.float32) * c.astype(jnp.float32))
                                     for x, c in zip(fn(q, k), cts))
  g = jax.grad(loss(lambda q, k: qk_norm.normalise(q, k, 0.3, use_l2norm)), argnums=(0, 1))(q, k)
  gr = jax.grad(loss(lambda q, k: qk_norm.reference(q, k, 0.3, use_l2norm)), argnums=(0, 1))(q, k)
  for a, b in zip(g, gr):
    assert rel(a, b) <= 1e-6
  assert "pallas_call" in str(jax.make_jaxpr(lambda q, k: qk_norm.normalise(q, k, 0.3, use_l2norm))(q, k))
  odd = q[:, :5]  # 20 rows: not a multiple of ROWS
  assert "pallas_call" not in str(jax.make_jaxpr(lambda q, k: qk_norm.normalise(q, k, 0.3, use_l2norm))(odd, odd))


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_gpu_inverse_precision(monkeypatch, precision):
  """prep's triangular inverse on the matrix units (16-bit compute dtypes only): the Triton lowering accepts the
  products, and the bf16 forward stays within its tolerance (interpret mode computes them in float32, tf32x3 as
  exact float32)."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "INVERSE_PRECISION", precision)
  fwd, bwd = lowered("pallas_gpu", "cuda", H=2)
  assert "gdn_prep" in fwd and "gdn_grads_v3" in bwd
  x = make_inputs(4, 1, 65, 1, 32, 32, dtype=jnp.bfloat16)
  check_forward("pallas_gpu", x, 2e-2)
  monkeypatch.setattr(pallas_gpu, "INVERSE_PRECISION", "fp16")
  with pytest.raises(ValueError, match="INVERSE_PRECISION"):
    check_forward("pallas_gpu", x, 2e-2)


def _jaxprs(backend):
  x = make_inputs(5, 1, 64, 1, 16, 16)
  f = lambda q, k, v, g, b: chunk_gated_delta_rule(q, k, v, g, b, backend=backend)[0]
  args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
  fwd = jax.make_jaxpr(f)(*args)
  bwd = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4)))(*args)
  return str(fwd), str(bwd)


@pytest.mark.parametrize("backend", PALLAS)
def test_no_silent_fallback(backend):
  fwd, bwd = _jaxprs(backend)
  assert "pallas_call" in fwd
  # the backward recomputes w/u and the states, runs the reverse state pass and the gradient kernel
  assert bwd.count("pallas_call") >= fwd.count("pallas_call") + 3


def lowered(backend, platform, H, segments=True):
  """Texts of the forward and backward lowered for ``platform`` at InfiniteVL's head dims (B=1, T=128, K=128,
  V=256, bf16), outside interpret mode; with or without segment ids."""
  from pallas_kernels import _compat
  B, T, K, V = 1, 128, 128, 256
  sd = jax.ShapeDtypeStruct
  args = (sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, K), jnp.bfloat16), sd((B, T, H, V), jnp.bfloat16),
          sd((B, T, H), jnp.float32), sd((B, T, H), jnp.bfloat16))
  seg = jnp.zeros((B, T), jnp.int32) if segments else None
  f = lambda *a: chunk_gated_delta_rule(*a, segment_ids=seg, backend=backend)[0]
  loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) ** 2)
  with _compat.compiled():
    return tuple(jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
                 for fn in (f, jax.grad(loss, argnums=(0, 1, 2, 3, 4))))


def test_tpu_lowering():
  """Lowers forward and backward for TPU at InfiniteVL's head shape (a lowering, not a TPU compilation)."""
  for text in lowered("pallas_tpu", "tpu", H=16):
    assert "tpu_custom_call" in text


def test_gpu_lowering():
  """Lowers forward and backward through the Pallas Triton lowering at InfiniteVL's head shape (a lowering to Triton
  IR, not a compilation: shared-memory and register limits are only checked on a GPU)."""
  fwd, bwd = lowered("pallas_gpu", "cuda", H=4)
  assert fwd.count("xla.gpu.triton") >= 2 and "gdn_prep" in fwd
  assert bwd.count("xla.gpu.triton") >= fwd.count("xla.gpu.triton") + 3 and "gdn_grads_v3" in bwd


@pytest.mark.parametrize("diag", ["doubling", "substitution", "dense"])
def test_gpu_lowering_without_segments(monkeypatch, diag):
  """Without segment ids or an initial state the kernels read no gate arrays but g and beta (KERNEL_GATES): that
  path lowers too, with either inverse of the diagonal tiles."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "PREP_DENSE", diag == "dense")
  if diag != "dense":
    monkeypatch.setattr(pallas_gpu, "DIAG_INVERSE", diag)
  fwd, bwd = lowered("pallas_gpu", "cuda", H=2, segments=False)
  assert "gdn_prep" in fwd and "gdn_grads_v3" in bwd


# The serial passes' other column width (BV = 64, the default before BV = 32), with resets placed inside chunks and
# at a chunk edge, an initial state that still reaches the first tokens, and weak gates that carry the state.
SERIAL_RESETS = {63: (20,), 65: (64,), 300: (30, 290)}


@pytest.mark.parametrize("T", sorted(SERIAL_RESETS))
def test_gpu_serial_passes_bv64(monkeypatch, T):
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "BV", 64)
  x = make_inputs(zlib.crc32(repr(("bv64", T)).encode()), 1, T, 2, 16, 64, gate="near0", resets=False)
  t = jnp.arange(T)[None]
  x["segment_ids"] = sum((t >= r).astype(jnp.int32) for r in SERIAL_RESETS[T])
  check_forward("pallas_gpu", x, 1e-5)
  check_grads("pallas_gpu", x)


def test_gpu_lowering_serial_passes_bv64(monkeypatch):
  """Forward and backward with BV = 64 lower to Triton IR at H=16, K=128, V=256."""
  from pallas_kernels.gated_delta_rule import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "BV", 64)
  fwd, bwd = lowered("pallas_gpu", "cuda", H=16)
  assert "gdn_prep" in fwd and "gdn_grads_v3" in bwd


# ---------------------------------------------------------------- full grid (run with -m slow)

GRID = [(T, init, resets, gate) for T in (1, 63, 64, 65, 300) for init in (False, True)
        for resets in (False, True) for gate in ("near0", "strong")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ("xla",) + PALLAS)
@pytest.mark.parametrize("T,init,resets,gate", GRID)
def test_grid(backend, T, init, resets, gate):
  seed = zlib.crc32(repr((backend, T, init, resets, gate)).encode())  # stable across runs (unlike str hash)
  x = make_inputs(seed, 1, T, 2, 32, 16, gate=gate, resets=resets, init=init)
  check_forward(backend, x, 1e-5)
  check_grads(backend, x)
  xb = make_inputs(seed + 1, 1, T, 2, 32, 16, gate=gate, resets=resets, init=init, dtype=jnp.bfloat16)
  check_forward(backend, xb, 2e-2)


# ---------------------------------------------------------------- one-token decode kernel (Pallas GPU)

def decode_inputs(seed, B, H, K, V, *, gate, dtype=jnp.float32):
  """One token (q, k, v, g, beta [B, 1, H, *]) and a state [B, H, K, V], drawn with NumPy (no per-shape compiles);
  gates as `make_inputs`."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  a = normal(B, 1, H)
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  g = {"near0": -0.01 * sig(a), "strong": -2.0 - 3.0 * sig(a), "mixed": -np.logaddexp(0.0, a)}[gate]
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(normal(B, 1, H, K)), cast(normal(B, 1, H, K)), cast(normal(B, 1, H, V)), jnp.asarray(g, jnp.float32),
          cast(sig(normal(B, 1, H))), jnp.asarray(normal(B, H, K, V)))


def max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@functools.lru_cache(maxsize=None)
def _decode_fns():
  """Jitted kernel (interpret mode), XLA step and float32 recurrence, shared by the tests of one worker."""
  from pallas_kernels.gated_delta_rule.decode_gpu import decode_step_gpu
  from pallas_kernels.gated_delta_rule.fused_recurrent import decode_step
  f32 = lambda a: a.astype(jnp.float32)
  kernel = jax.jit(lambda q, k, v, g, b, s: decode_step_gpu(q, k, v, g, b, initial_state=s, interpret=True))
  xla = jax.jit(lambda q, k, v, g, b, s: decode_step(q, k, v, g, b, initial_state=s, output_final_state=True))
  naive = jax.jit(lambda q, k, v, g, b, s: naive_recurrent_gated_delta_rule(
      f32(q), f32(k), f32(v), g, f32(b), initial_state=s, output_final_state=True))
  return kernel, xla, naive


@pytest.mark.parametrize("B,H,K,V", [(B, H, K, V) for B in (1, 2) for H in (1, 3) for K in (16, 128)
                                     for V in (32, 256)])
def test_gpu_decode_interpret(B, H, K, V):
  """The decode kernel (interpret mode) against the XLA `decode_step` and the float32 token recurrence, with
  gates near 0 and strongly negative, float32 and bfloat16 inputs (the state is float32 in all)."""
  kernel, xla, naive = _decode_fns()
  for gate in ("near0", "strong"):
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
      x = decode_inputs(zlib.crc32(repr((B, H, K, V, gate)).encode()), B, H, K, V, gate=gate, dtype=dtype)
      o, s = kernel(*x)
      assert o.shape == (B, 1, H, V) and o.dtype == dtype and s.shape == (B, H, K, V) and s.dtype == jnp.float32
      for ref in (xla, naive):
        o_r, s_r = ref(*x)
        for got, want in ((o, o_r), (s, s_r)):
          assert rel(got, want) <= tol, (gate, dtype, rel(got, want))
          if got.dtype == jnp.float32:  # float32 outputs: also elementwise (relative to the largest entry)
            assert max_rel(got, want) <= 1e-5, (gate, dtype, max_rel(got, want))


def test_gpu_decode_dispatch_and_options():
  """T = 1 with a state runs the kernel for backend "pallas_gpu", and for "auto" on an sm80+ GPU; options and
  gradients follow `decode_step`."""
  from pallas_kernels.gated_delta_rule.fused_recurrent import decode_backend, decode_step
  q, k, v, g, beta, h0 = decode_inputs(11, 1, 2, 16, 16, gate="mixed")  # V < BV

  def jaxpr(backend, state=h0, T=1):
    rep = lambda x: jnp.concatenate([x] * T, axis=1)
    return str(jax.make_jaxpr(lambda *a: fused_recurrent_gated_delta_rule(
        *a, initial_state=state, output_final_state=True, backend=backend))(rep(q), rep(k), rep(v), rep(g), rep(beta)))

  assert "pallas_call" in jaxpr("pallas_gpu")
  for backend in ("xla", "pallas_tpu"):
    assert "pallas_call" not in jaxpr(backend), backend
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0") or 0) >= 8.0
  assert ("pallas_call" in jaxpr("auto")) == on_gpu  # a CPU host: the XLA step
  assert "pallas_call" not in jaxpr("pallas_gpu", state=None) and "pallas_call" not in jaxpr("pallas_gpu", T=2)
  with pytest.raises(ValueError, match="does not support"):
    decode_backend("pallas_gpu", 48, 64)
  assert decode_backend("auto", 48, 64) == "xla"

  # no L2 norm, explicit scale, no final state (interpreted on a CPU host; the default options: the tests above)
  kw = dict(scale=0.3, use_qk_l2norm=False)
  o, s = jax.jit(lambda *a: fused_recurrent_gated_delta_rule(*a, initial_state=h0, backend="pallas_gpu", **kw))(
      q, k, v, g, beta)
  o_x, _ = jax.jit(lambda *a: decode_step(*a, initial_state=h0, **kw))(q, k, v, g, beta)
  assert s is None and max_rel(o, o_x) <= 1e-5

  # reverse mode through the XLA step's VJP
  def loss(backend, *a):
    o, s = fused_recurrent_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, backend=backend)
    return jnp.sum(o * jnp.sin(o + 1.0)) + jnp.sum(s * jnp.cos(s))

  args = (q, k, v, g, beta, h0)
  got = jax.jit(jax.grad(functools.partial(loss, "pallas_gpu"), argnums=tuple(range(6))))(*args)
  want = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=tuple(range(6))))(*args)
  for n, a, b in zip(ARGNAMES, got, want):
    assert rel(a, b) <= 1e-5, (n, rel(a, b))


def test_gpu_decode_lowering():
  """Lowers one decode step through the Pallas Triton lowering at InfiniteVL's decode shape (B=1, H=16, K=128,
  V=256, bf16 operands, float32 state): one Triton call, state output aliased to the state input."""
  from pallas_kernels import _compat
  B, H, K, V = 1, 16, 128, 256
  sd = jax.ShapeDtypeStruct
  args = (sd((B, 1, H, K), jnp.bfloat16), sd((B, 1, H, K), jnp.bfloat16), sd((B, 1, H, V), jnp.bfloat16),
          sd((B, 1, H), jnp.float32), sd((B, 1, H), jnp.bfloat16), sd((B, H, K, V), jnp.float32))
  f = lambda q, k, v, g, b, s: fused_recurrent_gated_delta_rule(q, k, v, g, b, initial_state=s,
                                                                output_final_state=True, backend="pallas_gpu")
  with _compat.compiled():
    text = jax.jit(f, donate_argnums=5).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 1 and "gdn_decode" in text
  assert "output_operand_alias<output_tuple_indices = [1], operand_index = 5" in text
