"""The embedded demo: synthetic data -> tiny Qwen2.5-VL teacher -> tiny InfiniteVL -> stages I-1, I-2, II, III, plus
an SWA-only ablation, and a table of eval accuracy (``python train.py --config configs/demo.yaml``).

Every stage is an ordinary ``trainer.run`` of a ``TrainConfig`` derived from the demo's base config, each initialised
from the previous stage's checkpoint, so the demo exercises exactly the code the release configs use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time

from infinitevl_jax.config import FULL, SWA
from infinitevl_jax.training import config as tc
from infinitevl_jax.training import trainer
from infinitevl_jax.training.demo_data import CHANCE

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    workdir: str = "runs/demo"
    teacher_steps: int = 300
    i1_steps: int = 100
    i2_steps: int = 100
    ii_steps: int = 150
    iii_steps: int = 50
    teacher_lr: float = 3e-3
    student_lr: float = 2e-3
    lora_lr: float = 2e-3
    iii_seq_len: int = 128
    iii_filler: int = 96
    eval_questions: int = 256
    stage2_ffn: bool = False  # the paper figure's option: FFN trainable in stage II
    fresh: bool = True  # start from an empty workdir (else every stage resumes from its checkpoints there)


def _cfg(base: tc.TrainConfig, **sections) -> tc.TrainConfig:
    out = base
    for name, changes in sections.items():
        if isinstance(changes, dict):
            out = dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **changes)})
        else:
            out = dataclasses.replace(out, **{name: changes})
    return out


def _run(cfg: tc.TrainConfig) -> dict:
    res = trainer.run(cfg)
    if res["preempted"]:  # SIGTERM: the stage saved its checkpoint; rerunning with demo.fresh=false resumes
        raise SystemExit(f"demo interrupted during {cfg.stage} ({cfg.checkpoint.dir}, step {res['step']})")
    return res


def _eval(cfg, res, batches) -> dict:
    fns, mc = res["fns"], res["model_config"]
    return {split: trainer.evaluate(cfg, mc, fns, res["trainable"], res["frozen"], f"eval_{split}", batches)
            for split in ("short", "long")}


def run_demo(base: tc.TrainConfig) -> list[dict]:
    d = tc.from_dict(DemoConfig, base.demo or {}, "demo")
    t0 = time.time()
    if d.fresh and os.path.isdir(d.workdir):
        shutil.rmtree(d.workdir)
    os.makedirs(d.workdir, exist_ok=True)
    bs = base.data.batch_size // base.optim.grad_accum
    batches = math.ceil(d.eval_questions / bs)
    rows: list[dict] = []

    def record(model, stage, cfg, res):
        ev = _eval(cfg, res, batches)
        losses = [res["losses"][i] for i in sorted(res["losses"])]
        k = max(1, min(5, len(losses) // 2))
        row = {"model": model, "stage": stage, "short": ev["short"]["exact_match"], "long": ev["long"]["exact_match"],
               "questions": ev["short"]["questions"], "minutes": (time.time() - t0) / 60,
               "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
        rows.append(row)
        logger.info("%s", row)
        print(f"[demo] {model:<10} {stage:<28} short {row['short']:.3f}  long {row['long']:.3f}  "
              f"loss {row['loss_first']:.4g} -> {row['loss_last']:.4g}  ({row['minutes']:.1f} min)", flush=True)

    # -- the teacher: every layer full attention, trained from scratch on the task
    text = dict(base.model.text_overrides)
    teacher_dir = os.path.join(d.workdir, "teacher")
    t_cfg = _cfg(base, stage="sft", model={"preset": "tiny_qwen2_5_vl", "layer_types": ()},
                 trainable=(r".*",), optim={"steps": d.teacher_steps, "lr": d.teacher_lr},
                 checkpoint={"dir": teacher_dir})
    res = _run(t_cfg)
    record("teacher", "trained from scratch", t_cfg, res)

    teacher = {"preset": "tiny_qwen2_5_vl", "text_overrides": text, "params": teacher_dir}
    n = len(trainer.student_config(base).text.layer_types)
    for model, layer_types in (("hybrid", ()), ("swa-only", (SWA,) * n)):
        work = os.path.join(d.workdir, model)
        mixers = tc.GDN_MIXER if not layer_types else r"language_model/layers/blocks/layers/\d+:[a-z_]+/self_attn/.*"
        common = dict(model={"preset": "tiny_infinitevl", "layer_types": layer_types}, teacher=teacher)
        prev = None
        if not layer_types:  # I-1 needs Gated DeltaNet layers; the SWA-only ablation starts at I-2
            cfg = _cfg(base, stage="layerwise", init={"from_teacher": True, "params": None}, trainable=(mixers,),
                       optim={"steps": d.i1_steps, "lr": d.student_lr}, checkpoint={"dir": f"{work}/i1"}, **common)
            res = _run(cfg)
            record(model, "I-1 layer-wise distillation", cfg, res)
            prev = f"{work}/i1"
        init = {"params": prev, "from_teacher": prev is None}
        cfg = _cfg(base, stage="e2e", init=init, trainable=(mixers,), optim={"steps": d.i2_steps, "lr": d.student_lr},
                   checkpoint={"dir": f"{work}/i2"}, **common)
        res = _run(cfg)
        record(model, "I-2 end-to-end KL", cfg, res)
        trainable = (mixers, tc.SWA_QKVO) + ((tc.FFN,) if d.stage2_ffn else ())
        cfg = _cfg(base, stage="sft", init={"params": f"{work}/i2", "from_teacher": False}, trainable=trainable,
                   optim={"steps": d.ii_steps, "lr": d.student_lr}, checkpoint={"dir": f"{work}/ii"}, **common)
        res = _run(cfg)
        record(model, "II SFT", cfg, res)
        cfg3 = _cfg(base, stage="lora", init={"params": f"{work}/ii", "from_teacher": False},
                    optim={"steps": d.iii_steps, "lr": d.lora_lr}, checkpoint={"dir": f"{work}/iii"},
                    data={"seq_len": d.iii_seq_len, "filler": d.iii_filler}, **common)
        res = _run(cfg3)
        record(model, "III long LoRA", cfg, res)  # evaluated on the base-length eval sets

    rows.append({"model": "total", "stage": "wall time", "minutes": (time.time() - t0) / 60})

    table = format_table(rows, batches * bs)
    print(table, flush=True)
    with open(os.path.join(d.workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(d.workdir, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def format_table(rows: list[dict], questions: int) -> str:
    lines = [f"Exact match of greedy answers, {questions} questions per set (chance {CHANCE:.3f}).", "",
             "| model | after | short questions | long memory (beyond the SWA window) |", "|---|---|---|---|"]
    for r in rows:
        if "short" in r:
            lines.append(f"| {r['model']} | {r['stage']} | {r['short']:.3f} | {r['long']:.3f} |")
        else:
            lines.append(f"| {r['model']} | {r['stage']} | {r['minutes']:.1f} min | |")
    return "\n".join(lines)
