"""The training config: a typed, validated tree of frozen dataclasses read from YAML plus ``key=value`` overrides.

An unknown key or a value of the wrong type stops with a message naming the key (``optim.lr: expected float, got
'fast'``). One YAML file per experiment (big_vision style); the stage configs under ``configs/`` carry the release's
defaults (REFERENCE section 7).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

import yaml

STAGES = ("layerwise", "e2e", "sft", "lora")

# Trainable-parameter patterns (regex, full match on ``params.split_model`` names).
GDN_MIXER = r"language_model/layers/blocks/layers/\d+:linear_attention/self_attn/.*"
SWA_QKVO = r"language_model/layers/blocks/layers/\d+:sliding_attention/self_attn/[qkvo]_proj/.*"
FFN = r"language_model/layers/blocks/layers/\d+:[a-z_]+/mlp/.*"
NO_DECAY = (r".*(norm|layernorm)[^/]*/.*", r".*/bias", r".*/A_log", r".*/dt_bias", r".*/o_norm", r".*norm/scale")


class TrainConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str = "infinitevl_4b"  # a name in infinitevl_jax.config.PRESETS or a Hugging Face config directory
    text_overrides: dict = dataclasses.field(default_factory=dict)  # tiny presets only: TextConfig fields
    layer_types: tuple = ()  # overrides the preset's layer pattern (e.g. every layer SWA for the ablation)
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"  # master weights
    remat: str = "none"  # none | full | dots | dots_no_batch


@dataclasses.dataclass(frozen=True)
class InitConfig:
    params: str | None = None  # an Orbax checkpoint directory of this model's params (a previous stage)
    from_teacher: bool = False  # build the student from the teacher's params + GDN mimic init


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    preset: str = "qwen2_5_vl_3b"
    text_overrides: dict = dataclasses.field(default_factory=dict)
    params: str | None = None  # Orbax checkpoint directory of the (converted) teacher


@dataclasses.dataclass(frozen=True)
class DataSection:
    kind: str = "json"  # json | demo (the synthetic memory task of ``training.demo_data``)
    sources: tuple = ()  # json: paths (files, dirs, globs); weights via "path@weight"
    processor: str | None = None  # processor directory (tokenizer + image settings)
    batch_size: int = 64
    seq_len: int = 8192
    seed: int = 0
    worker_count: int = 0
    num_epochs: int | None = 1
    long_fraction: float = 0.5  # demo: share of long-memory documents
    filler: int = 48  # demo: filler tokens between the fact and the question in long documents


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    warmup_frac: float = 0.01
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    steps: int = 1000


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple = (r".*/self_attn/[a-z]_proj/kernel", r".*/mlp/(gate|up|down)_proj/kernel")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    chunk_size: int = 2048  # tokens per logits chunk
    temperature: float = 2.0  # stage I-2
    layerwise_scale: float = 1000.0  # stage I-1


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    gdn: str = "auto"  # infinitevl_jax.ops.GDN_BACKENDS
    attention: str = "auto"  # infinitevl_jax.ops.ATTENTION_BACKENDS


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None
    every: int = 1000
    keep: int = 3
    use_async: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # 0: only at the end
    batches: int = 8


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10
    dir: str | None = None  # JSONL + TensorBoard events; default: checkpoint.dir
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    trainable: tuple = (GDN_MIXER, SWA_QKVO)
    no_decay: tuple = NO_DECAY
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    kernels: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    compilation_cache: str | None = None
    # Device mesh "data,fsdp,tensor" or "dcn,data,fsdp,tensor" (-1 fills; ``sharding.make_mesh``). Empty: no mesh on
    # one device, every device on fsdp ("1,-1,1") on several.
    mesh: str = ""
    peak_tflops: float = 989.0  # MFU denominator (H200 dense bf16 datasheet)
    demo: dict | None = None  # configs/demo*.yaml: the multi-stage demo (see training.demo)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise TrainConfigError(f"stage: {self.stage!r} is not one of {STAGES}")
        if self.optim.grad_accum < 1 or self.optim.steps < 1:
            raise TrainConfigError("optim.grad_accum and optim.steps must be >= 1")
        if self.data.batch_size % self.optim.grad_accum:
            raise TrainConfigError(f"data.batch_size={self.data.batch_size} is not divisible by "
                                   f"optim.grad_accum={self.optim.grad_accum}")
        if self.model.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise TrainConfigError(f"model.remat: {self.model.remat!r} is not none|full|dots|dots_no_batch")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self.model, name) not in ("float32", "bfloat16", "float16"):
                raise TrainConfigError(f"model.{name}: {getattr(self.model, name)!r} is not float32|bfloat16|float16")
        if self.data.kind not in ("json", "demo"):
            raise TrainConfigError(f"data.kind: {self.data.kind!r} is not json|demo")
        if self.mesh:
            check_mesh(self.mesh)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


def check_mesh(text: str) -> None:
    """``mesh``: 3 or 4 comma-separated sizes >= 1, at most one of them -1 (the device count is checked at start)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (3, 4) or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise TrainConfigError(f"mesh: {text!r} is not 'data,fsdp,tensor' or 'dcn,data,fsdp,tensor' (sizes >= 1, "
                               f"at most one -1 = the remaining devices), e.g. '1,-1,1'")


# ---------------------------------------------------------------------------------------------------------------


def _check(tp, value, where: str):
    """Checks ``value`` against the annotation ``tp`` and returns it converted (lists -> tuples, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, where)
            except TrainConfigError:
                pass
        raise TrainConfigError(f"{where}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{where}: expected int, got {value!r}")
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise TrainConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    if tp is dict:
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(klass, values: Mapping[str, Any], where: str = "config"):
    hints = typing.get_type_hints(klass)
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = "" if where == "config" else where + "."
        raise TrainConfigError(f"unknown key {prefix}{unknown[0]} (known in {where}: {sorted(names)})")
    kw = {k: _check(hints[k], v, k if where == "config" else f"{where}.{k}") for k, v in values.items()}
    try:
        return klass(**kw)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"{where}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["optim.lr=1e-4", "trainable=[a, b]"]`` -> a new nested dict (values parsed as YAML)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {key}: {p} is not a section")
        value = yaml.safe_load(text)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node[parts[-1]] = value
    return raw


def _deep_copy(d):
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def load_raw(path: str, overrides: list[str] = ()) -> dict:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(raw, list(overrides))


def load(path: str, overrides: list[str] = ()) -> TrainConfig:
    return from_dict(TrainConfig, load_raw(path, overrides))
