"""A/B of the Gated DeltaNet decode output path at the 4B shape (bf16, batch 1 as two rows), on a GPU.

A chain of 27 layers with distinct weights (27 x 16.8 MB of o_proj, far above L2), run 40 times inside one program
(a fori_loop: no host dispatch inside the timing), each layer: the mixer kernel, then either the output-norm kernel and XLA's o_proj product (``decode_mixer_gpu`` + ``jnp.dot``: the library's path) or
one kernel doing the output norm and o_proj together (``decode_mixer_proj_gpu``, a Pallas Triton GEMV over D / block_n
programs, weight [D, H V] or [H V, D]), swept over block_n and warps. Correctness first (the fused output against the
library's path on the same caches). Prints microseconds per layer; writes $OUT/out_proj_bench.json.

    PYTHONPATH=. python3 benchmarks/gdn_out_proj_ab.py
"""
import sys, time, json, os, itertools
import numpy as np, jax, jax.numpy as jnp
from pallas_kernels.gated_delta_rule import decode_mixer as dm

L, B, R, H, K, V, D, W = int(os.environ.get("LAYERS", 27)), 1, 2, 16, 128, 256, 2048, 4
REPS = int(os.environ.get("REPS", 40))
dt = jnp.bfloat16
N = 2 * H * (K + V + 1)
kw = dict(num_heads=H, head_k=K, head_v=V, eps=1e-6)
keys = (jax.random.key(i) for i in itertools.count())
nrm = lambda shape, s=1.0, d=dt: (jax.random.normal(next(keys), shape, jnp.float32) * s).astype(d)
proj = nrm((L, R, N))
conv_w = nrm((L, W, 2 * H * K + H * V), 0.3)
A_log, dt_bias, o_norm = nrm((L, H), 0.5, jnp.float32), nrm((L, H), 0.5, jnp.float32), 1 + nrm((L, V), 0.1)
Wo = nrm((L, H * V, D), 0.02)
WoT = jnp.swapaxes(Wo, 1, 2).copy()
live = jnp.ones((B,), bool)

def caches():
    return [(nrm((B, W - 1, H * K)), nrm((B, W - 1, H * K)), nrm((B, W - 1, H * V)),
             nrm((B, H, K, V), 0.1, jnp.float32)) for _ in range(L)]

def layers(variant, o, proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT, cs):
    outs, new = [], []
    for l in range(L):
        cq, ck, cv, s = cs[l]
        a = (proj[l], cq, ck, cv, conv_w[l], A_log[l], dt_bias[l], o_norm[l], live, s)
        if variant == "xla":
            y, cq, ck, cv, s = dm.decode_mixer_gpu(*a, **kw)
            out = jnp.dot(y, Wo[l])
        elif variant == "mix_only":
            y, cq, ck, cv, s = dm.decode_mixer_gpu(*a, **kw)
            out = y[:, :D]
        else:
            out, cq, ck, cv, s = dm.decode_mixer_proj_gpu(*a, WoT[l] if o["transposed"] else Wo[l], **kw, **o)
        outs.append(out)
        new.append((cq, ck, cv, s))
    return jnp.stack(outs), new


def make(variant, reps=1, **o):
    """The chain run ``reps`` times on the device (a fori_loop carrying the caches and the sum of the outputs, which
    each pass reads into its first input row so no pass can be dropped): one dispatch per call."""
    def step(proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT, cs):
        if reps == 1:
            return layers(variant, o, proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT, cs)

        def body(i, carry):
            acc, cs = carry
            p = proj.at[:, 0, 0].add(acc.astype(proj.dtype))
            out, cs = layers(variant, o, p, conv_w, A_log, dt_bias, o_norm, Wo, WoT, cs)
            return acc + out[:, 0, 0].astype(jnp.float32) * 1e-3, cs
        acc, cs = jax.lax.fori_loop(0, reps, body, (jnp.zeros((L,), jnp.float32), cs))
        return acc, cs
    return jax.jit(step, donate_argnums=(7,))


def run(variant, reps=REPS, **o):
    f = make(variant, reps=reps, **o)
    cs = caches()
    args = (proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT)
    t0 = time.perf_counter(); out, cs = f(*args, cs); jax.block_until_ready(out); tc = time.perf_counter() - t0
    ts = []
    for rep in range(5):
        t0 = time.perf_counter()
        out, cs = f(*args, cs)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / reps / L * 1e6)
    return float(np.median(ts)), out, tc


res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
# correctness first: same fresh caches through both (one call each)
cs0 = caches()
ref = make("xla")(proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT, [tuple(x.copy() for x in c) for c in cs0])
for tr in (True, False):
    got = make("fused", transposed=tr, block_n=16, num_warps=8)(proj, conv_w, A_log, dt_bias, o_norm, Wo, WoT,
                                                                [tuple(x.copy() for x in c) for c in cs0])
    e = float(jnp.linalg.norm((got[0] - ref[0]).astype(jnp.float32)) / jnp.linalg.norm(ref[0].astype(jnp.float32)))
    es = max(float(jnp.max(jnp.abs(g - r))) for gc, rc in zip(got[1], ref[1]) for g, r in zip(gc, rc))
    print(f"correctness transposed={tr}: out rel {e:.2e}, caches max|diff| {es:.2e}", flush=True)
    res[f"rel_err_transposed_{tr}"] = e
base = []
for v in ("xla", "mix_only", "xla"):  # the library path twice: the spread between runs
    us, _, tc = run(v)
    base.append(us)
    print(f"{v}: {us:.2f} us/layer (compile {tc:.1f}s)", flush=True)
    res["rows"].append({"variant": v, "us": us})
sweep = list(itertools.product((True, False), (8, 16), (4, 8, 16))) + [(True, 32, 8), (True, 32, 16)]
for tr, bn, nw in sweep[:int(os.environ.get("SWEEP", len(sweep)))]:
    try:
        us, _, tc = run("fused", transposed=tr, block_n=bn, num_warps=nw)
        print(f"fused transposed={tr} bn={bn} warps={nw}: {us:.2f} us/layer (compile {tc:.1f}s)", flush=True)
        res["rows"].append({"variant": "fused", "transposed": tr, "block_n": bn, "warps": nw, "us": us})
    except Exception as e:
        print(f"fused transposed={tr} bn={bn} warps={nw}: {type(e).__name__} {str(e)[:200]}", flush=True)
us, _, _ = run("xla"); print(f"xla again: {us:.2f}", flush=True); res["rows"].append({"variant": "xla", "us": us})
with open(os.path.join(os.environ.get("OUT", "/tmp"), "out_proj_bench.json"), "w") as f:
    json.dump(res, f, indent=1)
