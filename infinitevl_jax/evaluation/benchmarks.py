"""The benchmark table: how each benchmark is prompted and scored, as data.

``get_benchmark(name)`` accepts VLMEvalKit's dataset names too (``MMBench_DEV_EN_V11`` -> MMBench,
``MathVista_MINI`` -> MathVista, ``TextVQA_VAL`` -> TextVQA). ``score(benchmark, samples, predictions)`` returns the
headline ``score`` (a percentage), per-category scores and the benchmark's own details.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Callable, Mapping, Sequence

from infinitevl_jax.evaluation import metrics
from infinitevl_jax.evaluation.data import Sample, parse_list
from infinitevl_jax.evaluation.prompts import MAX_PIXELS, MIN_PIXELS, OCRBENCH_MIN_PIXELS


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    prompt: str  # prompts.build_prompt style: "mcq" | "mmmu" | "vqa"
    metric: str  # key of SAMPLE_METRICS
    metric_label: str
    max_new_tokens: int = 128
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    circular: bool = False  # MMBench: also score every rotation group as one question
    paper: float | None = None  # InfiniteVL-4B in the paper (REFERENCE.md section 9)


BENCHMARKS: dict[str, Benchmark] = {b.name.lower(): b for b in (
    Benchmark("MMBench", "mcq", "choice", "circular accuracy", circular=True, paper=79.0),
    Benchmark("MMStar", "mcq", "choice", "accuracy"),
    Benchmark("SEEDBench", "mcq", "choice", "accuracy"),
    Benchmark("ScienceQA", "mcq", "choice", "accuracy"),
    Benchmark("RealWorldQA", "mcq", "choice", "accuracy", paper=67.3),
    Benchmark("AI2D", "mcq", "choice", "accuracy", paper=77.2),
    Benchmark("MMMU", "mmmu", "mmmu", "accuracy (rule-based)", max_new_tokens=1024, paper=44.0),
    Benchmark("MathVista", "vqa", "mathvista", "accuracy (rule-based)", max_new_tokens=1024, paper=65.4),
    Benchmark("OCRBench", "vqa", "ocrbench", "hits / n", min_pixels=OCRBENCH_MIN_PIXELS, paper=79.8),
    Benchmark("TextVQA", "vqa", "vqa", "VQA accuracy", paper=78.5),
    Benchmark("DocVQA", "vqa", "anls", "ANLS", paper=91.7),
    Benchmark("ChartQA", "vqa", "relaxed", "relaxed accuracy", paper=82.0),
)}
_ALIASES = {"seed": "seedbench", "sciqa": "scienceqa", "mmbenchen": "mmbench"}


def get_benchmark(name: str) -> Benchmark:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = _ALIASES.get(key, key)
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    # VLMEvalKit names carry a split/version suffix: the longest known name the key starts with.
    for known in sorted(BENCHMARKS, key=len, reverse=True):
        if key.startswith(known):
            return BENCHMARKS[known]
    for alias, known in _ALIASES.items():
        if key.startswith(alias):
            return BENCHMARKS[known]
    raise ValueError(f"unknown benchmark {name!r}; known: {[b.name for b in BENCHMARKS.values()]}")


# ------------------------------------------------------------------------------------ per-sample scores in [0, 1]


def _choice(sample: Sample, reply: str) -> float:
    return float(metrics.multiple_choice_correct(reply, sample.options, sample.answer))


def _mmmu(sample: Sample, reply: str) -> float:
    if sample.options:
        return _choice(sample, reply)
    return float(metrics.open_answer_correct(reply, sample.answers))


def _mathvista(sample: Sample, reply: str) -> float:
    choices = sample.meta.get("choices")
    choices = (parse_list(choices) or []) if isinstance(choices, str) else choices
    if sample.options or choices:
        options = sample.options or {chr(ord("A") + i): c for i, c in enumerate(choices)}
        letter = metrics.extract_choice(reply, options)
        if letter is None:
            return 0.0
        # The answer column holds either the option letter or the option text.
        return float(sample.answer.strip().upper() == letter or
                     options[letter].strip().lower() == sample.answer.strip().lower())
    precision = sample.meta.get("precision")
    try:
        precision = int(float(precision)) if precision is not None else None
    except ValueError:
        precision = None
    return float(metrics.open_answer_correct(reply, sample.answers, precision))


SAMPLE_METRICS: dict[str, Callable[[Sample, str], float]] = {
    "choice": _choice,
    "mmmu": _mmmu,
    "mathvista": _mathvista,
    "ocrbench": lambda s, r: float(metrics.ocrbench_hit(r, s.answers, s.category or "")),
    "vqa": lambda s, r: metrics.vqa_accuracy(r, s.answers),
    "anls": lambda s, r: metrics.anls(r, s.answers),
    "relaxed": lambda s, r: metrics.relaxed_accuracy(r, s.answers),
}


def _pct(values: Sequence[float]) -> float:
    return round(100.0 * sum(values) / len(values), 4) if values else 0.0


def score(benchmark: Benchmark, samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict:
    """Scores every sample of ``samples`` (all must have a prediction). Returns ``{"score", "n", "per_category",
    ...}`` with scores in percent."""
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise ValueError(f"{benchmark.name}: {len(missing)} samples have no prediction, e.g. {missing[:3]}")
    fn = SAMPLE_METRICS[benchmark.metric]
    per_sample = [fn(s, predictions[s.id]) for s in samples]
    by_cat: dict[str, list[float]] = defaultdict(list)
    for s, v in zip(samples, per_sample):
        by_cat[s.category or "all"].append(v)
    out = {"metric": benchmark.metric_label, "n": len(samples), "score": _pct(per_sample),
           "per_category": {c: _pct(v) for c, v in sorted(by_cat.items())}}
    if benchmark.circular:
        ids = [int(s.id) if s.id.isdigit() else i for i, s in enumerate(samples)]
        groups = metrics.circular_groups(ids, [v > 0.5 for v in per_sample])
        out["vanilla_accuracy"] = out["score"]
        out["questions"] = len(groups)
        out["score"] = _pct([float(v) for v in groups.values()])
    if benchmark.metric == "ocrbench":
        out["hits"] = int(sum(per_sample))
        groups = {g: [v for s, v in zip(samples, per_sample) if s.category in cats]
                  for g, cats in metrics.OCRBENCH_GROUPS.items()}
        out["per_group_hits"] = {g: int(sum(v)) for g, v in groups.items() if v}
    return out
