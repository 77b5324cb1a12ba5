"""One training stage: model(s) -> trainable/frozen split -> jitted step with accumulation -> checkpoints, metrics.

``run(cfg)`` trains ``cfg.optim.steps`` steps of ``cfg.stage``, resuming from the latest checkpoint in
``cfg.checkpoint.dir`` when there is one (params, optimizer state, step, RNG, data iterator state: the continuation is
bit-identical to an uninterrupted run). On SIGTERM every host saves at the same step and ``run`` returns with
``preempted=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from infinitevl_jax import config as model_config, ops
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration, prepare_inputs
from infinitevl_jax.training import checkpointing, lora, params as P
from infinitevl_jax.training.config import TrainConfig
from infinitevl_jax.training.stages import STAGE_LOSSES, answer_ce

logger = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---------------------------------------------------------------------------------------------------------------- models
def resolve_model_config(preset: str, text_overrides: dict, layer_types=()) -> model_config.InfiniteVLConfig:
    if preset in model_config.PRESETS:
        fn = model_config.PRESETS[preset]
        mc = fn(**text_overrides) if preset.startswith("tiny") else fn()
    else:
        mc = model_config.InfiniteVLConfig.from_hf(preset)
    if text_overrides and not preset.startswith("tiny"):
        import dataclasses
        mc = mc.replace(text=dataclasses.replace(mc.text, **text_overrides))
    if layer_types:
        mc = mc.with_layer_types(tuple(layer_types))
    return mc


def build(mc, cfg: TrainConfig, seed: int, *, abstract: bool = False):
    def make():
        return InfiniteVLForConditionalGeneration(mc, dtype=DTYPES[cfg.model.compute_dtype],
                                                  param_dtype=DTYPES[cfg.model.param_dtype],
                                                  remat_policy=cfg.model.remat, rngs=nnx.Rngs(seed))
    model = nnx.eval_shape(make) if abstract else make()
    return P.split_model(model)


def student_config(cfg: TrainConfig):
    return resolve_model_config(cfg.model.preset, cfg.model.text_overrides, cfg.model.layer_types)


def teacher_config(cfg: TrainConfig):
    return resolve_model_config(cfg.teacher.preset, cfg.teacher.text_overrides)


def initial_params(cfg: TrainConfig, mc, teacher: tuple | None) -> tuple[P.ParamTree, dict]:
    tree, flat = build(mc, cfg, cfg.seed)
    if cfg.init.params:
        loaded = checkpointing.load_params(cfg.init.params)
        missing = sorted(set(flat) - set(loaded))
        if missing:
            raise ValueError(f"init.params {cfg.init.params} lacks {len(missing)} parameters, e.g. {missing[0]}")
        flat = {k: jnp.asarray(loaded[k], flat[k].dtype) for k in flat}
    elif cfg.init.from_teacher:
        if teacher is None:
            raise ValueError("init.from_teacher needs teacher.params")
        flat = P.init_student_from_teacher(flat, mc, teacher[1], teacher[2])
    return tree, flat


def load_teacher(cfg: TrainConfig):
    """``(tree, flat params, config)`` of the frozen teacher, or None when the stage and init need none."""
    if cfg.stage not in ("layerwise", "e2e") and not (cfg.init.from_teacher and not cfg.init.params):
        return None
    if not cfg.teacher.params:
        raise ValueError(f"stage {cfg.stage} needs teacher.params (an Orbax checkpoint directory)")
    tc = teacher_config(cfg)
    tree, flat = build(tc, cfg, 0, abstract=True)
    loaded = checkpointing.load_params(cfg.teacher.params)
    flat = {k: jnp.asarray(loaded[k], DTYPES[cfg.model.param_dtype]) for k in flat}
    return tree, flat, tc


# ---------------------------------------------------------------------------------------------------------------- data
def make_iterator(cfg: TrainConfig, mc, split: str = "train", micro_batch: int | None = None):
    d = cfg.data
    bs = micro_batch or d.batch_size // cfg.optim.grad_accum
    if d.kind == "demo":
        from infinitevl_jax.training.demo_data import DemoIterator
        return DemoIterator(split=split, batch_size=bs, seq_len=d.seq_len, seed=d.seed, long_fraction=d.long_fraction,
                            filler=d.filler, bos=mc.bos_token_id, eos=mc.eos_token_id, pad=mc.pad_token_id)
    from infinitevl_jax.data import DataConfig, SourceConfig, make_data_iterator
    sources = []
    for s in d.sources:
        path, _, w = s.partition("@")
        sources.append(SourceConfig(path, weight=float(w or 1.0)))
    if split != "train":
        raise ValueError("json data has no held-out split configured")
    dc = DataConfig(sources=tuple(sources), batch_size=bs, seq_len=d.seq_len, seed=d.seed,
                    worker_count=d.worker_count, num_epochs=d.num_epochs, process_index=jax.process_index(),
                    process_count=jax.process_count())
    return make_data_iterator(dc, d.processor)


def device_batch(mc, batch: dict) -> dict:
    """A host batch (packing layout) -> the arrays ``model.forward`` takes, plus labels."""
    out = {k: jnp.asarray(batch[k]) for k in ("input_ids", "labels", "segment_ids", "position_ids")}
    n_img = int(batch.get("num_images", 0))
    if n_img:
        pv = np.asarray(batch["pixel_values"])
        prepared = prepare_inputs(mc, batch["input_ids"], segment_ids=batch["segment_ids"],
                                  position_ids=batch["position_ids"], image_grid_thw=batch["image_grid_thw"][:n_img],
                                  pixel_values=pv[: int(np.prod(batch["image_grid_thw"][:n_img], 1).sum())],
                                  pad_patches_to=pv.shape[0])
        out["pixel_values"], out["image_layout"] = jnp.asarray(pv), prepared["image_layout"]
    return out


def stack_micro(batches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


# ---------------------------------------------------------------------------------------------------------------- optimizer
def schedule(o) -> optax.Schedule:
    warm = max(1, int(round(o.warmup_frac * o.steps)))
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(o.steps, warm + 1), o.lr * o.min_lr_ratio)


def optimizer(cfg: TrainConfig, trainable: dict) -> optax.GradientTransformation:
    no_decay = set(P.select(P.flatten_names(trainable), cfg.no_decay))
    mask = P.map_names(trainable, lambda name, _: name not in no_decay)
    o = cfg.optim
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask))


# ---------------------------------------------------------------------------------------------------------------- steps
class StepFns:
    """The jitted train and eval steps of one stage."""

    def __init__(self, cfg: TrainConfig, tree: P.ParamTree, teacher, tx):
        self.cfg, self.tree, self.tx = cfg, tree, tx
        loss = STAGE_LOSSES[cfg.stage]
        t_tree = teacher[0] if teacher and cfg.stage in ("layerwise", "e2e") else None  # else only used for init
        is_lora = cfg.stage == "lora"

        def effective(trainable, frozen):
            if is_lora:
                return lora.merge(frozen, trainable, cfg.lora.rank, cfg.lora.alpha)
            return {**frozen, **trainable}

        def loss_fn(trainable, frozen, t_params, mb):
            student = tree.merge(effective(trainable, frozen))
            t_model = t_tree.merge(t_params) if t_tree is not None else None
            total, count, _ = loss(student, t_model, mb, cfg)
            return total, count

        def train_step(trainable, opt_state, frozen, t_params, batches):
            def micro(carry, mb):
                g_acc, l_acc, c_acc = carry
                (total, count), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, t_params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + total, c_acc + count), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (g, total, count), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                                                batches)
            denom = jnp.maximum(count, 1).astype(jnp.float32)
            g = jax.tree.map(lambda x: x / denom, g)
            updates, opt_state = tx.update(g, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            return trainable, opt_state, {"loss": total / denom, "grad_norm": optax.global_norm(g),
                                          "targets": count}

        def eval_step(trainable, frozen, batch):
            model = tree.merge(effective(trainable, frozen))
            total, count, correct = answer_ce(model, batch, cfg.loss.chunk_size)
            return total, count, correct

        def kernels(fn):  # the backends are chosen while tracing
            def traced(*args):
                with ops.use_backends(gdn=cfg.kernels.gdn, attention=cfg.kernels.attention):
                    return fn(*args)
            return traced

        self.loss_fn = kernels(loss_fn)
        self.train_step = jax.jit(kernels(train_step), donate_argnums=(0, 1))
        self.eval_step = jax.jit(kernels(eval_step))


def exact_match(correct: np.ndarray, labels: np.ndarray, segment_ids: np.ndarray) -> tuple[int, int]:
    """(documents whose every answer token is predicted greedily, documents with an answer). Teacher-forced argmax
    over the answer (incl. the stop token) equals greedy decoding's answer, so no generation loop is needed."""
    from infinitevl_jax.training.losses import IGNORE
    tgt = np.concatenate([labels[:, 1:], np.full_like(labels[:, :1], IGNORE)], 1) != IGNORE
    same = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], np.zeros_like(segment_ids[:, :1], bool)], 1)
    tgt &= same
    right = total = 0
    for b in range(labels.shape[0]):
        for s in np.unique(segment_ids[b][segment_ids[b] > 0]):
            m = (segment_ids[b] == s) & tgt[b]
            if m.any():
                total += 1
                right += int(correct[b][m].all())
    return right, total


def evaluate(cfg: TrainConfig, mc, fns: StepFns, trainable, frozen, split: str, batches: int) -> dict:
    it = make_iterator(cfg, mc, split=split, micro_batch=cfg.data.batch_size // cfg.optim.grad_accum)
    loss = count = right = total = 0
    for _ in range(batches):
        hb = next(it)
        t, c, corr = fns.eval_step(trainable, frozen, device_batch(mc, hb))
        loss, count = loss + float(t), count + int(c)
        r, n = exact_match(np.asarray(corr), hb["labels"], hb["segment_ids"])
        right, total = right + r, total + n
    return {"loss": loss / max(count, 1), "exact_match": right / max(total, 1), "questions": total}


# ---------------------------------------------------------------------------------------------------------------- metrics
class Metrics:
    def __init__(self, cfg: TrainConfig, total_steps: int, start: int):
        self.dir = cfg.log.dir or cfg.checkpoint.dir
        self.jsonl = self.tb = self.bar = None
        if self.dir and jax.process_index() == 0:
            os.makedirs(self.dir, exist_ok=True)
            self.jsonl = open(os.path.join(self.dir, "metrics.jsonl"), "a")
            if cfg.log.tensorboard:
                try:
                    from tensorboardX import SummaryWriter  # optional (test extra)
                    self.tb = SummaryWriter(os.path.join(self.dir, "tb"))
                except ImportError:
                    logger.warning("tensorboardX not installed: no TensorBoard events")
        if cfg.log.progress and jax.process_index() == 0:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_steps, initial=start, desc=cfg.stage, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        rec = {"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "exact_match")})
        elif prefix != "train" or step % 50 == 0:
            logger.info("step %d %s", step, rec)

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        for h in (self.jsonl, self.tb, self.bar):
            if h is not None:
                h.close()


def flops_per_token(flat: dict, trainable_count: int, mc, with_teacher: int) -> float:
    """2N forward + 2N backward through activations + 2N_trainable weight gradients (+ 2N per teacher forward);
    N counts the language model's matmul weights and the head (the embedding lookup is free)."""
    n = sum(math.prod(v.shape) for k, v in flat.items() if k.startswith("language_model/layers"))
    n += mc.text.vocab_size * mc.text.hidden_size
    return 4.0 * n + 2.0 * trainable_count + 2.0 * n * with_teacher


# ---------------------------------------------------------------------------------------------------------------- run
class _Preemption:
    def __init__(self):
        self.flag = False

    def __enter__(self):
        self.prev = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.prev)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            # The coordination service turns SIGTERM into one agreed step on every host.
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step)) or self.flag
        return self.flag


def setup_compilation_cache(path: str | None) -> None:
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(cfg: TrainConfig, *, profile_steps: tuple[int, int] | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    setup_compilation_cache(cfg.compilation_cache)
    mc = student_config(cfg)
    teacher = load_teacher(cfg)
    tree, flat = initial_params(cfg, mc, teacher)
    key = jax.random.PRNGKey(cfg.seed)
    if cfg.stage == "lora":
        frozen = flat
        trainable = lora.init(flat, cfg.lora.targets, cfg.lora.rank, jax.random.fold_in(key, 1))
    else:
        P.check_patterns(flat, cfg.trainable, "trainable")
        trainable, frozen = P.partition(flat, cfg.trainable)
    tx = optimizer(cfg, trainable)
    opt_state = tx.init(trainable)  # frozen parameters carry no optimizer state
    n_trainable = P.count_tree(trainable)
    logger.info("stage %s: %d trainable / %d parameters", cfg.stage, n_trainable, P.count(flat))
    fns = StepFns(cfg, tree, teacher, tx)
    t_params = teacher[1] if teacher and cfg.stage in ("layerwise", "e2e") else None
    it = make_iterator(cfg, mc)

    mngr, step = None, 0
    if cfg.checkpoint.dir:
        if jax.process_index() == 0:  # what ``infinitevl merge-lora`` needs to rebuild the model
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            with open(os.path.join(cfg.checkpoint.dir, "model_config.json"), "w") as f:
                json.dump(mc.to_dict(), f, indent=1)
        mngr = checkpointing.manager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, use_async=cfg.checkpoint.use_async)
        latest = mngr.latest_step()
        if latest is not None:
            abstract = _state(frozen, trainable, opt_state, 0, key, cfg)
            restored, data_state = checkpointing.restore(mngr, latest, jax.tree.map(np.asarray, abstract))
            trainable, opt_state, frozen, step, key = _unstate(restored, trainable, opt_state, frozen, cfg)
            it.set_state(data_state)
            logger.info("resumed from step %d", step)

    fpt = flops_per_token(flat, n_trainable, mc, 1 if t_params is not None else 0)
    metrics = Metrics(cfg, cfg.optim.steps, step)
    preempted = False
    result: dict[str, Any] = {"losses": {}}
    t_last, tok_acc = time.perf_counter(), 0
    with _Preemption() as pre:
        while step < cfg.optim.steps:
            if profile_steps and step == profile_steps[0]:
                jax.profiler.start_trace(os.path.join(metrics.dir or ".", "profile"))
            host = [next(it) for _ in range(cfg.optim.grad_accum)]
            batches = stack_micro([device_batch(mc, b) for b in host])
            trainable, opt_state, out = fns.train_step(trainable, opt_state, frozen, t_params, batches)
            step += 1
            tok_acc += int(sum(int((b["segment_ids"] > 0).sum()) for b in host))
            loss = float(out["loss"])
            result["losses"][step] = loss
            if profile_steps and step == profile_steps[1]:
                jax.profiler.stop_trace()
            if step % cfg.log.every == 0 or step == cfg.optim.steps:
                dt = time.perf_counter() - t_last
                tps = tok_acc / max(dt, 1e-9)
                metrics.write(step, {"loss": loss, "lr": float(schedule(cfg.optim)(step - 1)),
                                     "grad_norm": float(out["grad_norm"]), "tokens_per_s": tps,
                                     "mfu": tps * fpt / (cfg.peak_tflops * 1e12 * jax.device_count()),
                                     "skipped": float(getattr(it, "num_skipped", 0))})
                t_last, tok_acc = time.perf_counter(), 0
            metrics.advance()
            if on_step:
                on_step(step, out)
            if cfg.eval.every and step % cfg.eval.every == 0 and cfg.data.kind == "demo":
                metrics.write(step, evaluate(cfg, mc, fns, trainable, frozen, "eval_mixed", cfg.eval.batches), "eval")
            stop = pre.reached(step)
            if mngr and (stop or step % cfg.checkpoint.every == 0 or step == cfg.optim.steps):
                checkpointing.save(mngr, step, _state(frozen, trainable, opt_state, step, key, cfg), it.get_state(),
                                   force=stop)
            if stop:
                preempted = True
                logger.warning("SIGTERM: saved step %d, exiting", step)
                break
    if mngr:
        mngr.wait_until_finished()
        mngr.close()
    metrics.close()
    result.update(step=step, preempted=preempted, tree=tree, trainable=trainable, frozen=frozen, fns=fns,
                  model_config=mc, effective=(lora.merge(frozen, trainable, cfg.lora.rank, cfg.lora.alpha)
                                              if cfg.stage == "lora" else {**frozen, **trainable}))
    return result


def _state(frozen, trainable, opt_state, step, key, cfg) -> dict:
    if cfg.stage == "lora":
        params, extra = frozen, {"lora": checkpointing.nest({f"{n}/{k}": v for n, ab in trainable.items()
                                                              for k, v in ab.items()}),
                                 "lora_meta": {"rank": np.int32(cfg.lora.rank), "alpha": np.float32(cfg.lora.alpha)}}
    else:
        params, extra = {**frozen, **trainable}, {}
    return {"params": checkpointing.nest(params), "opt_state": opt_state, "step": np.int64(step),
            "rng": jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key, **extra}


def _unstate(restored, trainable, opt_state, frozen, cfg):
    params = checkpointing.flatten(restored["params"])
    if cfg.stage == "lora":
        frozen = {k: jnp.asarray(params[k]) for k in frozen}
        trainable = checkpointing._adapters(restored["lora"])
        trainable = {n: {k: jnp.asarray(v) for k, v in ab.items()} for n, ab in trainable.items()}
    else:
        frozen = {k: jnp.asarray(params[k]) for k in frozen}
        trainable = {k: jnp.asarray(params[k]) for k in trainable}
    opt_state = jax.tree.map(jnp.asarray, restored["opt_state"])
    return trainable, opt_state, frozen, int(restored["step"]), jnp.asarray(restored["rng"])
