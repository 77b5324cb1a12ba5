"""Training-step benchmark: tokens/s and MFU of one optimizer step, InfiniteVL (full-size 4B, random weights) vs the
same code in Qwen2.5-VL-3B teacher mode (every layer full attention, flash attention: ``--teacher-attention``,
default ``pallas_gpu``; ``cudnn`` refuses the training batches' segment ids), bf16 compute with
float32 master weights, batch 1 x T tokens of text, remat ``full`` unless ``--remat`` names others.

Modes: ``stage2`` (trainable: the token mixers' parameters; InfiniteVL: GDN + SWA q/k/v/o as in the release's stage II
config; teacher: every attention layer's q/k/v/o) and ``full`` (every language-model parameter; the vision tower is
frozen in every stage and text-only batches do not run it).

FLOPs per token (as issue 9 counts them): 2N forward + 2N backward through activations + 2N_trainable weight
gradients, N = the language stack's matmul weights + the LM head, plus the token mixers, forward and 2x backward:
- softmax attention, per layer and token: 4 * H * D * L_eff with L_eff = T/2 (causal) or min(window, T/2) (SWA);
- Gated DeltaNet (chunk C = 64), per layer and token: 2 * H * (2*K*V (state update) + 2*K*V (output)
  + C*(K+V) (intra-chunk)) -- the chunked form's matmul work.
MFU = tokens/s * FLOPs/token / 989e12 (H200/H100 SXM dense bf16 datasheet peak).

    python benchmarks/train_step.py                      # GPU: the table of the issue, JSON to $OUT or /tmp
    python benchmarks/train_step.py --tiny --lengths 128  # CPU smoke run of the same code
Results are appended to the JSON after every configuration, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.config import FULL, GDN, SWA
from infinitevl_jax.training import config as tc, params as P, trainer

PEAK = 989e12
STAGE2 = {  # trainable patterns of the "stage2" mode
    "infinitevl": (tc.GDN_MIXER, tc.SWA_QKVO),
    "teacher": (r"language_model/layers/blocks/layers/\d+:full_attention/self_attn/[qkvo]_proj/.*",),
}
FULL_FT = (r"language_model/.*",)


def train_config(model: str, mode: str, T: int, tiny: bool, teacher_attention: str = "pallas_gpu",
                 remat: str = "full") -> tc.TrainConfig:
    preset = {("infinitevl", False): "infinitevl_4b", ("teacher", False): "qwen2_5_vl_3b",
              ("infinitevl", True): "tiny_infinitevl", ("teacher", True): "tiny_qwen2_5_vl"}[model, tiny]
    return tc.TrainConfig(
        stage="sft", model=tc.ModelConfig(preset=preset, compute_dtype="bfloat16", param_dtype="float32",
                                          remat=remat),
        data=tc.DataSection(kind="demo", batch_size=1, seq_len=T),
        optim=tc.OptimConfig(lr=1e-5, steps=1000, warmup_frac=0.01),
        trainable=STAGE2[model] if mode == "stage2" else FULL_FT,
        loss=tc.LossConfig(chunk_size=min(2048, T)),
        kernels=tc.KernelConfig(gdn="auto", attention="auto" if model == "infinitevl" or tiny else teacher_attention))


def mixer_flops_per_token(mc, T: int) -> float:
    """Forward + backward (2x) FLOPs of the token mixers per token (see the module docstring)."""
    t = mc.text
    fwd = 0.0
    for kind in t.layer_types:
        if kind == GDN:
            H, K, V, C = t.num_linear_heads, t.linear_head_dim, t.linear_value_dim, 64
            fwd += 2 * H * (4 * K * V + C * (K + V))
        else:
            L = T / 2 if kind == FULL or not t.sliding_window else min(t.sliding_window, T / 2)
            fwd += 4 * t.num_attention_heads * t.head_dim * L
    return 3 * fwd


def flops_per_token(flat: dict, trainable: dict, mc, T: int) -> float:
    n = sum(math.prod(v.shape) for k, v in flat.items() if k.startswith("language_model/layers"))
    n += mc.text.vocab_size * mc.text.hidden_size
    return 4.0 * n + 2.0 * P.count_tree(trainable) + mixer_flops_per_token(mc, T)


def random_params(tree_flat: dict, seed: int = 0) -> dict:
    """Random float32 master weights (N(0, 0.02); norms at 1) for an abstract flat parameter dict, made on device."""
    names = sorted(tree_flat)

    @jax.jit
    def make(key):
        out = {}
        for i, n in enumerate(names):
            s = tree_flat[n]
            if "norm" in n or n.endswith("scale"):
                out[n] = jnp.ones(s.shape, jnp.float32)
            else:
                out[n] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)
        return out

    return make(jax.random.PRNGKey(seed))


def text_batch(T: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, 1, T), dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids), "segment_ids": jnp.ones((1, 1, T), jnp.int32),
            "position_ids": jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (1, 3, 1, T)).copy())}


def measure(model: str, mode: str, T: int, *, tiny: bool, steps: int, teacher_attention: str = "pallas_gpu",
            remat: str = "full") -> dict:
    cfg = train_config(model, mode, T, tiny, teacher_attention, remat)
    mc = trainer.student_config(cfg)
    tree, abstract = trainer.build(mc, cfg, 0, abstract=True)
    flat = random_params(abstract)
    trainable, frozen = P.partition(flat, cfg.trainable)
    tx = trainer.optimizer(cfg, trainable)
    opt_state = jax.jit(tx.init)(trainable)
    fns = trainer.StepFns(cfg, tree, None, tx)
    batch = text_batch(T, mc.text.vocab_size)
    t0 = time.perf_counter()
    compiled = fns.train_step.lower(trainable, opt_state, frozen, None, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    trainable, opt_state, out = compiled(trainable, opt_state, frozen, None, batch)  # warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, out = compiled(trainable, opt_state, frozen, None, batch)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t0) / steps
    fpt = flops_per_token(flat, trainable, mc, T)
    tps = T / dt
    return {"model": model, "mode": mode, "tokens": T, "remat": remat, "step_s": dt, "tokens_per_s": tps,
            "mfu": tps * fpt / PEAK,
            "flops_per_token": fpt, "trainable": P.count_tree(trainable), "loss": float(out["loss"]),
            "compile_s": compile_s, "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else None,
            "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run)")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--modes", default="stage2,full")
    p.add_argument("--models", default="infinitevl,teacher")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="full", help="remat policies to measure, comma-separated (decoder.REMAT_POLICIES)")
    p.add_argument("--teacher-attention", default="pallas_gpu", help="attention backend of the teacher mode")
    p.add_argument("--order", default="length", choices=("length", "mode"),
                   help="length: every mode at 8192 first, then longer; mode: all lengths of a mode first")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "train_step.json"))
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes, models = args.modes.split(","), args.models.split(",")
    remats = args.remat.split(",")
    combos = ([(T, m, mo, r) for T in lengths for m in modes for mo in models for r in remats]
              if args.order == "length" else [(T, m, mo, r) for m in modes for T in lengths for mo in models for r in remats])
    rows = []
    for T, mode, model, remat in combos:
        try:
            r = measure(model, mode, T, tiny=args.tiny, steps=args.steps, teacher_attention=args.teacher_attention,
                        remat=remat)
        except Exception as e:  # e.g. out of memory at 131072: record it, go on
            r = {"model": model, "mode": mode, "tokens": T, "remat": remat,
                 "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(r)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        if "error" in r:
            print(f"{model:<10} {mode:<6} T={T:<7} remat={remat} {r['error']}", flush=True)
        else:
            print(f"{model:<10} {mode:<6} T={T:<7} remat={remat:<5} {r['tokens_per_s']:>10.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                  f"step {r['step_s']:.3f}s  compile {r['compile_s']:.0f}s  temp {r['temp_gib']:.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
