"""Does a different layout of the fused gate_up weight let XLA fuse SiLU(gate) x up into the down product?

In the decode step's profile every MLP runs SiLU(gate) x up as its own small kernel (`loop_multiply_fusion`, ~1.5 us,
36 per step) between the gate_up and down products: the library computes ``y = x @ W_gu`` with W_gu [D, 2I] and
takes gate and up as the two halves of y's last axis. This probe times the same SwiGLU MLP written four ways, in a
chain of L layers with distinct weights (more bytes than L2 holds), two rows as in the decode step:
  * "halves": W_gu [D, 2I], gate = y[:, :I], up = y[:, I:] (the library);
  * "stacked": W [2, D, I], one batched product, gate = y[0], up = y[1];
  * "paired": W [D, I, 2] (gate and up of a column side by side), gate = y[..., 0], up = y[..., 1];
  * "two": gate and up as two products.
For each it counts the kernels XLA leaves in one layer's optimized HLO (fusions and custom calls; one fewer where
the multiply has moved into a product's fusion) and writes that HLO; then medians of interleaved rounds, us per
layer, and the relative error against "halves" in float32. Writes $OUT/mlp_formulation.json and each one-layer HLO
as text.

    PYTHONPATH=. python3 benchmarks/mlp_formulation_probe.py
"""
import json, os, re, sys

import jax, jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from decode_mlp_common import interleaved_rounds, rel_err, xla_mlp_layer  # noqa: E402
from timing import pipelined_seconds, read_probe_tbps  # noqa: E402

D, I, L, R = 2048, 11008, 8, 2


def stacked(x, w, wd):
  y = jnp.einsum("rd,tdi->tri", x, w)
  return (jax.nn.silu(y[0]) * y[1]) @ wd


def paired(x, w, wd):
  y = jnp.einsum("rd,dit->rit", x, w)
  return (jax.nn.silu(y[..., 0]) * y[..., 1]) @ wd


def two(x, w, wd):
  g, u = w
  return (jax.nn.silu(x @ g) * (x @ u)) @ wd


LAYOUTS = {  # name: (layer, the fused [D, 2I] weight in that layout)
    "halves": (xla_mlp_layer, lambda w: w),  # the library's form
    "stacked": (stacked, lambda w: jnp.stack([w[:, :I], w[:, I:]])),
    "paired": (paired, lambda w: jnp.stack([w[:, :I], w[:, I:]], axis=-1)),
    "two": (two, lambda w: (w[:, :I], w[:, I:])),
}


def chain(layer):
  def f(x, ws, wds):
    for w, wd in zip(ws, wds):
      x = x + layer(x, w, wd)
    return x
  return jax.jit(f)


def kernels(hlo: str):
  """Kernels in the entry computation of an optimized HLO module, and the fusion kinds named there."""
  entry = hlo[hlo.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  ops = re.findall(r"^\s*(?:ROOT )?\S+ = [^\n]*? (fusion|custom-call)\(", entry, re.MULTILINE)
  names = re.findall(r"calls=%?([\w.-]+)", entry)
  return len(ops), names


if __name__ == "__main__":
  out = os.environ.get("OUT", "/tmp")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "probe_TBps": read_probe_tbps(), "L": L}
  print(res, flush=True)
  keys = jax.random.split(jax.random.key(0), 2 * L + 1)
  wgu = [(jax.random.normal(keys[i], (D, 2 * I), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  wd = [(jax.random.normal(keys[L + i], (I, D), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
  x = jax.random.normal(keys[-1], (R, D), jnp.float32).astype(jnp.bfloat16)
  ref = chain(xla_mlp_layer)(x, wgu, wd)
  timers, res["layouts"] = {}, {}
  for name, (layer, relayout) in LAYOUTS.items():
    ws = [relayout(w) for w in wgu]
    one = jax.jit(layer).lower(x, ws[0], wd[0]).compile().as_text()
    open(os.path.join(out, f"mlp_{name}.hlo.txt"), "w").write(one)
    n, names = kernels(one)
    f = chain(layer)
    err = rel_err(f(x, ws, wd), ref)
    res["layouts"][name] = {"kernels_per_layer": n, "fusions": names, "rel_err_vs_halves": err}
    print(name, n, "kernels:", names, f"rel err {err:.2e}", flush=True)
    timers[name] = lambda f=f, ws=ws: pipelined_seconds(f, x, ws, wd) / L
  res["rounds_us"], res["median_us"] = interleaved_rounds(timers)
  json.dump(res, open(os.path.join(out, "mlp_formulation.json"), "w"), indent=1)
