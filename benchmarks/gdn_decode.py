"""One-token gated delta rule update (decode) on one GPU: the XLA `decode_step` vs the Pallas kernel `decode_step_gpu`.

One device call:
  XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/gdn_decode.py --out $OUT
  (--smoke: tiny shapes on CPU, the kernel in interpret mode: checks that the script runs end to end.)
Shape: B=1, H=16, K=128, V=256 per layer, bf16 q/k/v/beta, float32 g and state (2 MiB per layer), as InfiniteVL's
decode. What is timed is one jitted function that applies the update to 27 layers in sequence, like the model's 27
GDN layers: each layer has its own state (all 27 donated, so both versions can update in place) and the output of
layer l is the value input of layer l + 1 (the layers cannot overlap). Times are medians over repeats of the wall
clock around block_until_ready of a batch of calls. Both versions start from the same states; the outputs and
final states of one call are compared (norm-relative). Prints a table and writes gdn_decode.json to --out.
Floor per layer: the state read once and written once, 2 x B*H*K*V*4 bytes (4.19 MB: ~1 us at ~4 TB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule.decode_gpu import decode_step_gpu
from pallas_kernels.gated_delta_rule.fused_recurrent import decode_step

IMPLS = {
    "xla": lambda q, k, v, g, b, s: decode_step(q, k, v, g, b, initial_state=s, output_final_state=True),
    "pallas_gpu": lambda q, k, v, g, b, s: decode_step_gpu(q, k, v, g, b, initial_state=s),
}


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(L, B, H, K, V, dtype=jnp.bfloat16):
  """Per-layer token inputs [L, B, 1, H, *] and L states [B, H, K, V] float32."""
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q = jax.random.normal(ks[0], (L, B, 1, H, K), dtype)
  k = jax.random.normal(ks[1], (L, B, 1, H, K), dtype)
  v0 = jax.random.normal(ks[2], (B, 1, H, V), dtype)
  g = -jax.nn.softplus(jax.random.normal(ks[3], (L, B, 1, H), jnp.float32) - 2.0)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (L, B, 1, H), jnp.float32)).astype(dtype)
  states = tuple(jax.random.normal(jax.random.fold_in(ks[5], l), (B, H, K, V), jnp.float32) for l in range(L))
  return (q, k, v0, g, beta), states


def layers_fn(impl):
  """states, (q, k, v0, g, beta) -> (new states, output of the last layer); states donated."""
  step = IMPLS[impl]

  def run(states, xs):
    q, k, x, g, beta = xs
    new = []
    for l, s in enumerate(states):
      x, s = step(q[l], k[l], x, g[l], beta[l], s)
      new.append(s)
    return tuple(new), x

  return jax.jit(run, donate_argnums=0)


def copy(states):
  return tuple(jnp.array(s, copy=True) for s in states)


def bench(fn, states, xs, reps, inner):
  states, out = fn(states, xs)  # compile and warm up
  jax.block_until_ready((states, out))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      states, out = fn(states, xs)
    jax.block_until_ready((states, out))
    ts.append((time.perf_counter() - t0) / inner)
  return statistics.median(ts)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, kernel in interpret mode")
  ap.add_argument("--layers", type=int, default=27)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--inner", type=int, default=50)
  args = ap.parse_args()
  if args.smoke:
    L, (B, H, K, V), reps, inner = 3, (1, 2, 16, 32), 2, 2
  else:
    L, (B, H, K, V), reps, inner = args.layers, (1, 16, 128, 256), args.reps, args.inner
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; L={L} layers, B={B} H={H} K={K} V={V}",
        flush=True)

  xs, states = inputs(L, B, H, K, V)
  fns = {name: layers_fn(name) for name in IMPLS}

  # agreement: one call of each from the same states
  res = {name: jax.device_get(fn(copy(states), xs)) for name, fn in fns.items()}
  (s_x, o_x), (s_p, o_p) = res["xla"], res["pallas_gpu"]
  agree = dict(o_rel=rel(o_p, o_x), state_rel=max(rel(a, b) for a, b in zip(s_p, s_x)))
  agree["ok"] = agree["o_rel"] <= 2e-2 and agree["state_rel"] <= 2e-2
  print(f"agreement after {L} layers (pallas_gpu vs xla, norm-relative): output {agree['o_rel']:.2e}, "
        f"states {agree['state_rel']:.2e} -> {'ok' if agree['ok'] else 'MISMATCH'}", flush=True)

  state_bytes = 2 * B * H * K * V * 4  # one read + one write of each layer's state
  rows = {}
  for name, fn in fns.items():
    t = bench(fn, copy(states), xs, reps, inner)
    rows[name] = dict(ms_per_call=t * 1e3, us_per_layer=t / L * 1e6, state_gb_s=state_bytes * L / t / 1e9)
  print(f"\n| version | {L} layers (ms) | per layer (us) | state traffic (GB/s) | vs xla |")
  print("|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['ms_per_call']:.4f} | {r['us_per_layer']:.2f} | {r['state_gb_s']:.0f} | "
          f"{rows['xla']['ms_per_call'] / r['ms_per_call']:.2f}x |")
  print(f"floor per layer: {state_bytes / 1e6:.2f} MB -> {state_bytes / 4e12 * 1e6:.2f} us at 4 TB/s", flush=True)

  report = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__, smoke=args.smoke, layers=L,
                shape=dict(B=B, H=H, K=K, V=V), reps=reps, inner=inner, agreement=agree, results=rows,
                state_bytes_per_layer=state_bytes)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "gdn_decode.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {path}")
  if not agree["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
