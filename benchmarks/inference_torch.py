"""The PyTorch baseline of the inference benchmark: transformers' ``Qwen2_5_VLForConditionalGeneration.generate``
(sdpa attention, bf16, random weights in the Qwen2.5-VL-3B shapes), what a user would otherwise run.

For each context C a random prompt of C tokens is generated from twice: ``max_new_tokens=1`` (prefill plus one
token) and ``1 + N`` (``min_new_tokens`` forces all of them); decode ms/token = (t(1 + N) - t(1)) / N, prefill time =
t(1). Medians of ``--reps``. Writes ``$OUT/inference_torch.json``.

    python benchmarks/inference_torch.py --contexts 4096,65536 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import time


def build(tiny: bool):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from infinitevl_jax.config import qwen2_5_vl_3b, tiny_qwen2_5_vl
    from infinitevl_jax.convert import hf_config_dict

    cfg = Qwen2_5_VLConfig.from_dict(hf_config_dict(tiny_qwen2_5_vl() if tiny else qwen2_5_vl_3b()))
    cfg._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    return model, cfg, device


def timed_generate(model, ids, new_tokens: int) -> float:
    import torch

    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    import numpy as np
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    ap.add_argument("--contexts", default="4096,65536")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    model, cfg, device = build(args.tiny)
    vocab = cfg.get_text_config().vocab_size
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "attention": "sdpa", "contexts": {}}
    gen = torch.Generator().manual_seed(0)
    for C in [int(c) for c in args.contexts.split(",")]:
        ids = torch.randint(16, vocab - 16, (1, C), generator=gen).to(device)
        timed_generate(model, ids[:, : min(C, 256)], 2)  # warm-up
        one = [timed_generate(model, ids, 1) for _ in range(args.reps)]
        many = [timed_generate(model, ids, 1 + args.new_tokens) for _ in range(args.reps)]
        t1, tn = float(np.median(one)), float(np.median(many))
        row = {"prefill_s": t1, "prefill_tokens_per_s": C / t1, "decode_ms_per_token": (tn - t1) / args.new_tokens * 1e3}
        res["contexts"][C] = row
        print(f"torch generate ctx={C}: prefill {t1:.3f} s ({C / t1:.0f} tok/s), decode "
              f"{row['decode_ms_per_token']:.2f} ms/token", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "inference_torch.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
