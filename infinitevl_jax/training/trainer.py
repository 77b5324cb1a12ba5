"""One training stage: model(s) -> trainable/frozen split -> jitted step with accumulation -> checkpoints, metrics.

``run(cfg)`` trains ``cfg.optim.steps`` steps of ``cfg.stage``, resuming from the latest checkpoint in
``cfg.checkpoint.dir`` when there is one (params, optimizer state, step, RNG, data iterator state: the continuation is
bit-identical to an uninterrupted run). On SIGTERM every host saves at the same step and ``run`` returns with
``preempted=True``.

On a device mesh (``cfg.mesh``; by default every device on ``fsdp`` when there are several) parameters are created
shard by shard under ``jax.jit`` with the layouts of ``sharding.LOGICAL_RULES`` (never whole on one device), the
optimizer state and LoRA adapters take their parameters' layouts, each process feeds its rows of the global batch,
and the steps run under ``jax.set_mesh`` (activation constraints, kernels under ``shard_map``). Checkpoints hold the
sharded arrays and restore onto whatever mesh the resuming run uses.
"""

from __future__ import annotations

import dataclasses
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infinitevl_jax import config as model_config, distributed, ops, sharding
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


def train_mesh(cfg: TrainConfig) -> Mesh | None:
    """The run's device mesh: ``cfg.mesh``; when empty, none on one device and every device on ``fsdp`` on several."""
    text = cfg.mesh or ("1,-1,1" if jax.device_count() > 1 else "")
    if not text:
        return None
    try:
        return sharding.make_mesh(text)
    except ValueError as e:
        raise ValueError(f"mesh={text!r}: {e}") from None


def flat_shardings(model: nnx.Module, tree: P.ParamTree, mesh: Mesh, mc) -> dict[str, NamedSharding]:
    """``{name: NamedSharding}`` of a (possibly abstract) model's parameters, keyed and ordered like ``split_model``."""
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return dict(zip(tree.names, tree.treedef.flatten_up_to(sharding.state_shardings(params, mesh, mc))))


def build(mc, cfg: TrainConfig, seed: int, *, abstract: bool = False, mesh: Mesh | None = None):
    """``(ParamTree, flat params)`` of a freshly initialised model. With a ``mesh`` the parameters are initialised
    under ``jax.jit`` with ``out_shardings`` (each device computes only its shards) and ``abstract`` gives
    ``jax.ShapeDtypeStruct``s carrying those shardings."""
    def make():
        return InfiniteVLForConditionalGeneration(mc, dtype=DTYPES[cfg.model.compute_dtype],
                                                  param_dtype=DTYPES[cfg.model.param_dtype],
                                                  remat_policy=cfg.model.remat, rngs=nnx.Rngs(seed))
    if mesh is None:
        model = nnx.eval_shape(make) if abstract else make()
        return P.split_model(model)
    model = nnx.eval_shape(make)
    tree, flat = P.split_model(model)
    shardings = flat_shardings(model, tree, mesh, mc)
    if abstract:
        return tree, {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in flat.items()}
    with jax.set_mesh(mesh):
        flat = jax.jit(lambda: P.split_model(make())[1], out_shardings=shardings)()
    return tree, flat


def place(value, target) -> jax.Array:
    """A host array onto ``target``'s (a ``jax.ShapeDtypeStruct``) dtype and sharding; each device copies only its
    shard, so this works across processes (each holding the same host value)."""
    value = np.asarray(value, target.dtype)
    if value.shape != tuple(target.shape):
        raise ValueError(f"shape {value.shape} does not match {tuple(target.shape)}")
    return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])


def student_config(cfg: TrainConfig):
    return resolve_model_config(cfg.model.preset, cfg.model.text_overrides, cfg.model.layer_types)


def teacher_config(cfg: TrainConfig):
    return resolve_model_config(cfg.teacher.preset, cfg.teacher.text_overrides)


def initial_params(cfg: TrainConfig, mc, teacher: tuple | None, mesh: Mesh | None = None, *,
                   abstract: bool = False) -> tuple[P.ParamTree, dict]:
    """The student's starting parameters: fresh, ``init.params`` or built from the teacher. On a ``mesh`` they are
    sharded (``abstract``: only their shapes and shardings, e.g. as the target of a checkpoint restore)."""
    on_mesh = mesh is not None
    abstract = abstract and on_mesh
    tree, flat = build(mc, cfg, cfg.seed, mesh=mesh, abstract=abstract or (on_mesh and bool(cfg.init.params)))
    if abstract:
        return tree, flat
    if cfg.init.params:
        loaded = checkpointing.load_params(cfg.init.params)
        missing = sorted(set(flat) - set(loaded))
        if missing:
            raise ValueError(f"init.params {cfg.init.params} lacks {len(missing)} parameters, e.g. {missing[0]}")
        flat = {k: place(loaded[k], v) if on_mesh else jnp.asarray(loaded[k], v.dtype) for k, v in flat.items()}
    elif cfg.init.from_teacher:
        if teacher is None:
            raise ValueError("init.from_teacher needs teacher.params")
        init = lambda s, t: P.init_student_from_teacher(s, mc, t, teacher[2])
        if on_mesh:
            init = jax.jit(init, out_shardings={k: v.sharding for k, v in flat.items()})
        flat = init(flat, teacher[1])
    return tree, flat


def load_teacher(cfg: TrainConfig, mesh: Mesh | None = None):
    """``(tree, flat params, config)`` of the frozen teacher, or None when the stage and init need none."""
    if cfg.stage not in ("layerwise", "e2e") and not (cfg.init.from_teacher and not cfg.init.params):
        return None
    if not cfg.teacher.params:
        raise ValueError(f"stage {cfg.stage} needs teacher.params (an Orbax checkpoint directory)")
    tc = teacher_config(cfg)
    tree, flat = build(tc, cfg, 0, abstract=True, mesh=mesh)
    loaded = checkpointing.load_params(cfg.teacher.params)
    if mesh is not None:
        return tree, {k: place(loaded[k], v) for k, v in flat.items()}, tc
    flat = {k: jnp.asarray(loaded[k], DTYPES[cfg.model.param_dtype]) for k in flat}
    return tree, flat, tc


def init_lora(cfg: TrainConfig, base: dict, key: jax.Array, mesh: Mesh | None = None, *,
              abstract: bool = False) -> dict:
    """LoRA adapters of ``base``; on a mesh ``a [..., in, r]`` takes its kernel's layout of ``in`` and
    ``b [..., r, out]`` that of ``out`` (the rank is never split)."""
    if mesh is None:
        return lora.init(base, cfg.lora.targets, cfg.lora.rank, key)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in base.items()}

    def make(k):
        return lora.init(shapes, cfg.lora.targets, cfg.lora.rank, k)

    def layout(*entries):
        while entries and entries[-1] is None:
            entries = entries[:-1]
        return NamedSharding(mesh, PartitionSpec(*entries))

    key = np.asarray(key)
    out = jax.eval_shape(make, key)
    shardings = {}
    for n in out:
        spec = tuple(base[n].sharding.spec) + (None,) * (base[n].ndim - len(base[n].sharding.spec))
        shardings[n] = {"a": layout(*spec[:-1], None), "b": layout(*spec[:-2], None, spec[-1])}
    if abstract:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), out, shardings)
    return jax.jit(make, out_shardings=shardings)(key)


# ---------------------------------------------------------------------------------------------------------------- data
ROW_KEYS = ("input_ids", "labels", "segment_ids", "position_ids")  # per-row arrays (position_ids: [3, B, T])


def make_iterator(cfg: TrainConfig, mc, split: str = "train", micro_batch: int | None = None,
                  mesh: Mesh | None = None):
    """Host batches of ``micro_batch`` rows (default: the micro-batch of ``cfg``). The json source reads this
    process's shard of the records; on a mesh with several processes it yields only this process's rows."""
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
    if mesh is not None and jax.process_count() > 1:
        start, stop = distributed.process_batch_rows(bs, mesh)
        if (stop - start) * jax.process_count() != bs:
            raise ValueError(f"micro-batch of {bs} rows (data.batch_size / optim.grad_accum) is not split evenly over "
                             f"the {jax.process_count()} processes by the batch axes of mesh {dict(mesh.shape)}")
        bs = stop - start
    dc = DataConfig(sources=tuple(sources), batch_size=bs, seq_len=d.seq_len, seed=d.seed,
                    worker_count=d.worker_count, num_epochs=d.num_epochs, process_index=jax.process_index(),
                    process_count=jax.process_count())
    return make_data_iterator(dc, d.processor)


def host_batch(mc, batch: dict) -> dict:
    """A host batch (packing layout) -> the numpy arrays ``model.forward`` takes, plus labels."""
    out = {k: np.asarray(batch[k]) for k in ROW_KEYS}
    n_img = int(batch.get("num_images", 0))
    if n_img:
        pv = np.asarray(batch["pixel_values"])
        prepared = prepare_inputs(mc, batch["input_ids"], segment_ids=batch["segment_ids"],
                                  position_ids=batch["position_ids"], image_grid_thw=batch["image_grid_thw"][:n_img],
                                  pixel_values=pv[: int(np.prod(batch["image_grid_thw"][:n_img], 1).sum())],
                                  pad_patches_to=pv.shape[0])
        out["pixel_values"], out["image_layout"] = pv, prepared["image_layout"]
    return out


def device_batch(mc, batch: dict) -> dict:
    """``host_batch`` on the default device."""
    return {k: v if k == "image_layout" else jnp.asarray(v) for k, v in host_batch(mc, batch).items()}


def stack_micro(batches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def process_rows(batch: dict, mesh: Mesh, rows: int) -> dict:
    """This process's rows of a whole host batch of ``rows`` rows (unchanged in a single process or when ``batch``
    already holds only this process's rows)."""
    if jax.process_count() == 1 or np.shape(batch["input_ids"])[0] != rows:
        return batch
    start, stop = distributed.process_batch_rows(rows, mesh)
    return {k: (v[:, start:stop] if k == "position_ids" else v[start:stop]) if k in ROW_KEYS else v
            for k, v in batch.items()}


def mesh_batch(arrays: dict, mesh: Mesh, rows: int, *, stacked: bool) -> dict:
    """Host arrays holding this process's rows -> global arrays of ``rows`` rows sharded over the batch mesh axes
    (``stacked``: behind a leading micro-batch axis). Image inputs (not per row) are replicated."""
    lead = 1 if stacked else 0
    out = {}
    for key, value in arrays.items():
        if key not in ROW_KEYS:
            if jax.process_count() > 1:
                raise NotImplementedError(f"{key}: image batches are not supported on a multi-process mesh")
            out[key] = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), value)
            continue
        value = np.asarray(value)
        shape = list(value.shape)
        shape[lead + (key == "position_ids")] = rows
        spec = distributed.batch_sharding(mesh, key, shape[lead:]).spec
        target = NamedSharding(mesh, PartitionSpec(*(None,) * lead, *spec))
        out[key] = jax.make_array_from_process_local_data(target, value, tuple(shape))
    return out


def feed(mc, hosts: list[dict], mesh: Mesh | None, rows: int) -> dict:
    """``grad_accum`` host micro-batches of ``rows`` rows -> the train step's ``[accum, B, ...]`` arrays: on the
    default device, or on a mesh global arrays sharded over the batch axes, each process giving its own rows."""
    if mesh is None:
        return stack_micro([device_batch(mc, b) for b in hosts])
    local = [host_batch(mc, process_rows(b, mesh, rows)) for b in hosts]
    return mesh_batch(jax.tree.map(lambda *xs: np.stack(xs), *local), mesh, rows, stacked=True)


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


def init_opt_state(tx: optax.GradientTransformation, trainable: dict, mesh: Mesh | None = None, *,
                   abstract: bool = False):
    """``tx.init(trainable)``; on a mesh under ``jax.jit`` with each state leaf mirroring a parameter sharded like it
    (scalars such as the step count replicated)."""
    if mesh is None:
        return tx.init(trainable)
    shapes = jax.eval_shape(tx.init, trainable)
    shardings = optax.tree_map_params(tx, lambda _, s: s, shapes, jax.tree.map(lambda x: x.sharding, trainable),
                                      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
    if abstract:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return jax.jit(tx.init, out_shardings=shardings)(trainable)


# ---------------------------------------------------------------------------------------------------------------- steps
class _OnMesh:
    """A jitted function traced and run under ``jax.set_mesh(mesh)``."""

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


class StepFns:
    """The jitted train and eval steps of one stage.

    On a ``mesh`` they run under ``jax.set_mesh`` and the train step returns the trainable parameters and the
    optimizer state with the shardings they came in with (``jax.jit`` ``out_shardings``), step after step.
    """

    def __init__(self, cfg: TrainConfig, tree: P.ParamTree, teacher, tx, *, mesh: Mesh | None = None,
                 trainable=None, opt_state=None):
        self.cfg, self.tree, self.tx, self.mesh = cfg, tree, tx, mesh
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
            return trainable, opt_state, {"loss": total / denom, "grad_norm": optax.tree.norm(g),
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
        if mesh is None:
            self.train_step = jax.jit(kernels(train_step), donate_argnums=(0, 1))
            self.eval_step = jax.jit(kernels(eval_step))
        else:
            if trainable is None or opt_state is None:
                raise ValueError("StepFns on a mesh needs the (abstract) trainable params and optimizer state")
            layout = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
            out = (layout(trainable), layout(opt_state), NamedSharding(mesh, PartitionSpec()))
            self.train_step = _OnMesh(jax.jit(kernels(train_step), donate_argnums=(0, 1), out_shardings=out), mesh)
            self.eval_step = _OnMesh(jax.jit(kernels(eval_step)), mesh)


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


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(cfg: TrainConfig, mc, fns: StepFns, trainable, frozen, split: str, batches: int) -> dict:
    rows = cfg.data.batch_size // cfg.optim.grad_accum
    it = make_iterator(cfg, mc, split=split, micro_batch=rows)
    loss = count = right = total = 0
    for _ in range(batches):
        hb = next(it)
        if fns.mesh is None:
            batch = device_batch(mc, hb)
        else:
            batch = mesh_batch(host_batch(mc, process_rows(hb, fns.mesh, rows)), fns.mesh, rows, stacked=False)
        t, c, corr = fns.eval_step(trainable, frozen, batch)
        loss, count = loss + float(t), count + int(c)
        r, n = exact_match(to_host(corr), hb["labels"], hb["segment_ids"])
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


@dataclasses.dataclass
class Prepared:
    """What one stage trains: models, parameters (split into trainable and frozen), optimizer and step functions."""

    mc: Any
    mesh: Mesh | None
    tree: P.ParamTree
    flat: dict  # the starting parameters
    trainable: Any
    frozen: dict
    tx: optax.GradientTransformation
    opt_state: Any
    fns: StepFns
    teacher: tuple | None
    t_params: dict | None
    key: jax.Array


def prepare(cfg: TrainConfig, mesh: Mesh | None = None, *, abstract: bool = False) -> Prepared:
    """Builds a stage. On a ``mesh`` every array is sharded; ``abstract`` (mesh only) gives the parameters and
    optimizer state as ``jax.ShapeDtypeStruct``s with their shardings, the target of a checkpoint restore (nothing
    is initialised)."""
    abstract = abstract and mesh is not None
    mc = student_config(cfg)
    teacher = load_teacher(cfg, mesh) if not abstract or cfg.stage in ("layerwise", "e2e") else None
    tree, flat = initial_params(cfg, mc, teacher, mesh, abstract=abstract)
    key = jax.random.PRNGKey(cfg.seed)
    if cfg.stage == "lora":
        frozen = flat
        trainable = init_lora(cfg, flat, jax.random.fold_in(key, 1), mesh, abstract=abstract)
    else:
        P.check_patterns(flat, cfg.trainable, "trainable")
        trainable, frozen = P.partition(flat, cfg.trainable)
    tx = optimizer(cfg, trainable)
    opt_state = init_opt_state(tx, trainable, mesh, abstract=abstract)  # frozen parameters carry no optimizer state
    fns = StepFns(cfg, tree, teacher, tx, mesh=mesh, trainable=trainable, opt_state=opt_state)
    t_params = teacher[1] if teacher and cfg.stage in ("layerwise", "e2e") else None
    return Prepared(mc, mesh, tree, flat, trainable, frozen, tx, opt_state, fns, teacher, t_params, key)


def run(cfg: TrainConfig, *, profile_steps: tuple[int, int] | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    setup_compilation_cache(cfg.compilation_cache)
    mesh = train_mesh(cfg)
    if mesh is not None:
        logger.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    mc = student_config(cfg)
    mngr, step, latest = None, 0, None
    if cfg.checkpoint.dir:
        if jax.process_index() == 0:  # what ``infinitevl merge-lora`` needs to rebuild the model
            os.makedirs(cfg.checkpoint.dir, exist_ok=True)
            with open(os.path.join(cfg.checkpoint.dir, "model_config.json"), "w") as f:
                json.dump(mc.to_dict(), f, indent=1)
        mngr = checkpointing.manager(cfg.checkpoint.dir, keep=cfg.checkpoint.keep, use_async=cfg.checkpoint.use_async)
        latest = mngr.latest_step()
    s = prepare(cfg, mesh, abstract=latest is not None)
    tree, flat, trainable, frozen, opt_state, fns, t_params, key = (s.tree, s.flat, s.trainable, s.frozen, s.opt_state,
                                                                    s.fns, s.t_params, s.key)
    n_trainable = P.count_tree(trainable)
    logger.info("stage %s: %d trainable / %d parameters", cfg.stage, n_trainable, P.count(flat))
    it = make_iterator(cfg, mc, mesh=mesh)
    rows = cfg.data.batch_size // cfg.optim.grad_accum
    if latest is not None:
        abstract = _state(frozen, trainable, opt_state, 0, key, cfg)
        target = jax.tree.map(np.asarray if mesh is None else _restore_target, abstract)
        restored, data_state = checkpointing.restore(mngr, latest, target)
        trainable, opt_state, frozen, step, key = _unstate(restored, trainable, opt_state, frozen, cfg, mesh)
        it.set_state(data_state)
        logger.info("resumed from step %d", step)
    # tokens per step: the host batches hold every row, except json batches on a multi-process mesh (this process's)
    tok_scale = jax.process_count() if mesh is not None and cfg.data.kind == "json" else 1

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
            batches = feed(mc, host, mesh, rows)
            trainable, opt_state, out = fns.train_step(trainable, opt_state, frozen, t_params, batches)
            step += 1
            tok_acc += tok_scale * int(sum(int((b["segment_ids"] > 0).sum()) for b in host))
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
    result.update(step=step, preempted=preempted, tree=tree, trainable=trainable, frozen=frozen, opt_state=opt_state,
                  fns=fns, model_config=mc, effective=(lora.merge(frozen, trainable, cfg.lora.rank, cfg.lora.alpha)
                                              if cfg.stage == "lora" else {**frozen, **trainable}))
    return result


def _state(frozen, trainable, opt_state, step, key, cfg) -> dict:
    if cfg.stage == "lora":
        params, extra = frozen, {"lora": checkpointing.nest({f"{n}/{k}": v for n, ab in trainable.items()
                                                              for k, v in ab.items()}),
                                 "lora_meta": {"rank": np.int32(cfg.lora.rank), "alpha": np.float32(cfg.lora.alpha)}}
    else:
        params, extra = {**frozen, **trainable}, {}
    rng = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return {"params": checkpointing.nest(params), "opt_state": opt_state, "step": np.int64(step),
            "rng": np.asarray(rng), **extra}


def _restore_target(x):
    """Restore target of one leaf on a mesh: arrays are read straight into their shardings; host values stay host."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _unstate(restored, trainable, opt_state, frozen, cfg, mesh=None):
    params = checkpointing.flatten(restored["params"])
    arr = jnp.asarray if mesh is None else (lambda x: x)  # on a mesh the restored arrays are already placed
    if cfg.stage == "lora":
        frozen = {k: arr(params[k]) for k in frozen}
        trainable = checkpointing._adapters(restored["lora"])
        trainable = {n: {k: arr(v) for k, v in ab.items()} for n, ab in trainable.items()}
    else:
        frozen = {k: arr(params[k]) for k in frozen}
        trainable = {k: arr(params[k]) for k in trainable}
    opt_state = jax.tree.map(arr, restored["opt_state"])
    return trainable, opt_state, frozen, int(restored["step"]), jnp.asarray(restored["rng"])
