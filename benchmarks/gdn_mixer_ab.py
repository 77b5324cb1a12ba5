"""A/B on one GPU: the GDN decode mixer as its two Pallas kernels (`decode_mixer_gpu`) against one kernel whose last
program per head does the second kernel's work (`decode_mixer_gpu_fused`, a [B, H] arrival counter kept at zero).

Timed: one jitted decode of a chain of LAYERS (27) GDN layers, in_proj -> mixer -> o_proj + residual, distinct bf16
weights per layer (4B shapes: D 2048, H 16, K 128, V 256; two rows, as the decode step's padded products), caches
donated. Both versions first run STEPS steps from the same caches and are compared (max |diff| of the output, conv
windows and state; the counters must be back at zero). Then ROUNDS interleaved rounds, each timing 3 groups of 30
back-to-back calls per version (median), in us per layer. FUSED_FIRST=1 times the one-kernel version first in each
round. Writes gdn_mixer_ab.json to $OUT.

  OUT=$OUT PYTHONPATH=. STEPS=300 ROUNDS=9 FUSED_FIRST=1 python3 benchmarks/gdn_mixer_ab.py
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from decode_mlp_common import interleaved_rounds
from timing import read_probe_tbps
from pallas_kernels.gated_delta_rule import decode_mixer as dm

L, D, H, K, V, W = int(os.environ.get("LAYERS", 27)), 2048, 16, 128, 256, 4
N = 2 * H * (K + V + 1)
kw = dict(num_heads=H, head_k=K, head_v=V, eps=1e-6)
res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "probe_TBps": read_probe_tbps()}
print(res, flush=True)
ks = jax.random.split(jax.random.key(0), 8)
bf = jnp.bfloat16
w_in = [(jax.random.normal(jax.random.fold_in(ks[0], l), (D, N)) * 0.02).astype(bf) for l in range(L)]
w_o = [(jax.random.normal(jax.random.fold_in(ks[1], l), (H * V, D)) * 0.02).astype(bf) for l in range(L)]
conv_w = (jax.random.uniform(ks[2], (W, H * (2 * K + V)), jnp.float32, -0.5, 0.5)).astype(bf)
A_log = jnp.log(jax.random.uniform(ks[3], (H,), jnp.float32, 1.0, 16.0))
dt_bias = jax.random.normal(ks[4], (H,)) - 3.0
o_norm = jnp.ones((V,), bf)
live = jnp.ones((1,), bool)
x0 = jax.random.normal(ks[5], (2, D)).astype(bf).at[1:].set(0)


def caches(fused):
  out = []
  for l in range(L):
    k = jax.random.fold_in(ks[6], l)
    c = [jax.random.normal(jax.random.fold_in(k, i), (1, W - 1, H * d)).astype(bf) for i, d in enumerate((K, K, V))]
    c.append(jax.random.normal(jax.random.fold_in(k, 9), (1, H, K, V)) * 0.1)
    if fused:
      c.append(jnp.zeros((1, H), jnp.int32))
    out.append(tuple(c))
  return tuple(out)


def make(fused):
  def step(x, cs, w_in, w_o):
    new = []
    for l in range(L):
      proj = x @ w_in[l]
      if fused:
        y, *c = dm.decode_mixer_gpu_fused(proj, *cs[l][:3], conv_w, A_log, dt_bias, o_norm, live, *cs[l][3:], **kw)
      else:
        y, *c = dm.decode_mixer_gpu(proj, *cs[l][:3], conv_w, A_log, dt_bias, o_norm, live, cs[l][3], **kw)
      x = x + (y @ w_o[l]).astype(bf)
      new.append(tuple(c))
    return x, tuple(new)
  return jax.jit(step, donate_argnums=(1,))


fns = {"two_kernels": make(False), "fused": make(True)}
state = {"two_kernels": caches(False), "fused": caches(True)}
# correctness: STEPS steps from the same caches
outs = {}
for name, f in fns.items():
  x, cs = x0, caches(name == "fused")
  for _ in range(int(os.environ.get("STEPS", 3))):
    x, cs = f(x, cs, w_in, w_o)
  outs[name] = (x, cs)
xa, ca = outs["two_kernels"]; xb, cb = outs["fused"]
res["max_abs_x"] = float(jnp.max(jnp.abs(xa.astype(jnp.float32) - xb.astype(jnp.float32))))
res["max_abs_state"] = max(float(jnp.max(jnp.abs(a[3] - b[3]))) for a, b in zip(ca, cb))
res["max_abs_conv"] = max(float(jnp.max(jnp.abs(a[i].astype(jnp.float32) - b[i].astype(jnp.float32)))) for a, b in zip(ca, cb) for i in range(3))
res["arrivals_max"] = max(int(jnp.max(b[4])) for b in cb)
res["finite"] = bool(jnp.isfinite(xa.astype(jnp.float32)).all()), bool(jnp.isfinite(xb.astype(jnp.float32)).all())
res["state_absmax"] = max(float(jnp.max(jnp.abs(a[3]))) for a in ca)
print(res, flush=True)


def timer(name, calls=30, groups=3):
  f = fns[name]
  def t():
    x, cs = x0, state[name]
    for _ in range(2):
      x, cs = f(x, cs, w_in, w_o)
    jax.block_until_ready(x)
    ts = []
    for _ in range(groups):
      t0 = time.perf_counter()
      for _ in range(calls):
        x, cs = f(x, cs, w_in, w_o)
      jax.block_until_ready((x, cs))
      ts.append((time.perf_counter() - t0) / calls)
    state[name] = cs
    return float(np.median(ts)) / L
  return t


order = list(fns)[::-1] if os.environ.get("FUSED_FIRST") else list(fns)
rounds, med = interleaved_rounds({n: timer(n) for n in order}, rounds=int(os.environ.get("ROUNDS", 7)))
res["arrivals_after_timing"] = max(int(jnp.max(b[4])) for b in state["fused"])
res.update(rounds=rounds, median_us_per_layer=med, layers=L)
out = os.environ.get("OUT", "/tmp")
json.dump(res, open(os.path.join(out, "gdn_mixer_ab.json"), "w"), indent=1)
