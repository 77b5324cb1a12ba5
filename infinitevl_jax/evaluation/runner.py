"""Batched, resumable benchmark runs and their results files.

Layout next to ``--out results.json``::

    results.json                          {"checkpoint", "benchmarks": {name: {"score", "metric", "n", ...}}}
    results.md                            the same as a markdown table (paper numbers alongside)
    results.<Benchmark>.predictions.jsonl one {"id", "prediction"} line per answered question, appended per batch

A run first reads the predictions file (dropping a line cut short by a kill) and only asks the model about the
questions it does not answer yet, so a killed run resumes where it stopped. Results of several benchmarks (and of
successive runs) accumulate in one results file. In a multi-process run every process computes every batch (the
model is sharded over the global mesh) and only process 0 writes.

``answer_fn(prompts: list[Prompt]) -> list[str]`` is the only thing a run needs from a model:
``ModelAnswerer(model, processor)`` is the one backed by ``infinitevl_jax.inference.generate``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from infinitevl_jax.evaluation.benchmarks import Benchmark, get_benchmark, score
from infinitevl_jax.evaluation.data import Sample, read_samples
from infinitevl_jax.evaluation.prompts import Prompt, build_prompt

logger = logging.getLogger(__name__)

AnswerFn = Callable[[list[Prompt]], list[str]]


# ------------------------------------------------------------------------------------------- predictions file


def predictions_path(out: str, benchmark: Benchmark) -> str:
    stem, _ = os.path.splitext(out)
    return f"{stem}.{benchmark.name}.predictions.jsonl"


def read_predictions(path: str, repair: bool = False) -> dict[str, str]:
    """``{id: prediction}`` from a predictions file; a malformed (half-written) line is skipped, and with
    ``repair`` the file is rewritten without it so that later appends start on a fresh line."""
    if not os.path.exists(path):
        return {}
    out: dict[str, str] = {}
    good: list[str] = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                pid, pred = str(rec["id"]), str(rec["prediction"])
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            if not line.endswith("\n"):
                bad += 1  # a complete record without its newline: keep it, rewrite the file properly
            if pid not in out:
                out[pid] = pred
                good.append(json.dumps({"id": pid, "prediction": pred}, ensure_ascii=False) + "\n")
    if bad and repair:
        logger.warning("%s: dropped %d malformed line(s)", path, bad)
        _atomic_write(path, "".join(good))
    return out


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(path: str, records: Iterable[tuple[str, str]]) -> None:
    text = "".join(json.dumps({"id": i, "prediction": p}, ensure_ascii=False) + "\n" for i, p in records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class _Progress:
    """tqdm when available, else a line per batch on stderr."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total, self.done, self.desc = total, initial, desc
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="q", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- one benchmark


def evaluate_benchmark(benchmark: Benchmark | str, samples: Sequence[Sample], answer_fn: AnswerFn, *,
                       predictions_file: str, batch_size: int = 8, limit: int | None = None, progress: bool = True,
                       writer: bool = True, min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """Answers the questions of ``samples`` not yet in ``predictions_file`` (in batches of ``batch_size``, appending
    each batch), then scores all of them. Returns the benchmark's results dict (``score`` in percent, ``n``,
    ``resumed``: answers read back from an earlier run, ``answered``: answers computed now)."""
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    samples = list(samples)[:limit] if limit else list(samples)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{bench.name}: duplicate question ids in the data")
    done = read_predictions(predictions_file, repair=writer)
    todo = [s for s in samples if s.id not in done]
    key = getattr(answer_fn, "batch_key", None)
    if key is not None:
        # Questions whose inputs have the same shapes go together, so a batch reuses compiled programs more often.
        keys = {s.id: key(_prompt(bench, s, min_pixels, max_pixels)) for s in todo}
        todo.sort(key=lambda s: keys[s.id])
    resumed = len(samples) - len(todo)
    if resumed:
        logger.info("%s: %d/%d answers already in %s", bench.name, resumed, len(samples), predictions_file)
    bar = _Progress(len(samples), resumed, bench.name, progress and writer)
    start = time.perf_counter()
    try:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            prompts = [_prompt(bench, s, min_pixels, max_pixels) for s in batch]
            replies = answer_fn(prompts)
            if len(replies) != len(batch):
                raise ValueError(f"answer_fn returned {len(replies)} replies for {len(batch)} prompts")
            if writer:
                _append(predictions_file, [(s.id, r) for s, r in zip(batch, replies)])
            done.update({s.id: r for s, r in zip(batch, replies)})
            bar.update(len(batch))
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    result = score(bench, samples, done)
    result.update(resumed=resumed, answered=len(todo), seconds=round(elapsed, 3), limit=limit,
                  predictions=os.path.basename(predictions_file))
    return result


def _prompt(bench: Benchmark, sample: Sample, min_pixels: int | None, max_pixels: int | None) -> Prompt:
    return build_prompt(sample, bench.prompt, min_pixels=min_pixels or bench.min_pixels,
                        max_pixels=max_pixels or bench.max_pixels)


# ------------------------------------------------------------------------------------------- results files


def read_results(path: str) -> dict:
    if not os.path.exists(path):
        return {"benchmarks": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_results(path: str, results: Mapping[str, dict], checkpoint: str | None = None) -> dict:
    """Merges ``{benchmark: results}`` into the results JSON at ``path`` and rewrites its markdown table."""
    merged = read_results(path)
    if checkpoint is not None:
        merged["checkpoint"] = checkpoint
    merged.setdefault("benchmarks", {}).update(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(os.path.splitext(path)[0] + ".md", results_markdown(merged))
    return merged


def results_markdown(results: Mapping) -> str:
    lines = [f"# Evaluation: {results.get('checkpoint', '')}".rstrip(), "",
             "| Benchmark | Metric | Score | N | Paper (InfiniteVL-4B) |", "|---|---|---:|---:|---:|"]
    for name, r in sorted(results.get("benchmarks", {}).items()):
        try:
            paper = get_benchmark(name).paper
        except ValueError:
            paper = None
        n = f"{r['n']}" + (f" (limit {r['limit']})" if r.get("limit") else "")
        lines.append(f"| {name} | {r['metric']} | {r['score']:.2f} | {n} | {'' if paper is None else paper} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- model-backed answers


class ModelAnswerer:
    """``answer_fn`` over ``infinitevl_jax.inference.generate``: each batch is rendered with the chat template
    (default system prompt, generation prompt), left-padded, and decoded greedily until ``<|im_end|>``."""

    def __init__(self, model, processor, *, max_new_tokens: int = 128, prefill_chunk: int = 512):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk
        self._processors: dict[tuple[int, int], object] = {}
        self._prepared = None

    def _processor_for(self, min_pixels: int, max_pixels: int):
        key = (min_pixels, max_pixels)
        if key not in self._processors:
            from infinitevl_jax.processing import ImageProcessorConfig

            proc = copy.copy(self.processor)
            proc.image_config = ImageProcessorConfig.from_dict(
                {**self.processor.image_config.to_dict(), "min_pixels": min_pixels, "max_pixels": max_pixels})
            self._processors[key] = proc
        return self._processors[key]

    def batch_key(self, prompt: Prompt) -> tuple:
        """The resized (height, width) of each image: equal keys give equal vision-tower shapes."""
        from PIL import Image

        from infinitevl_jax.processing import smart_resize

        cfg = self._processor_for(prompt.min_pixels, prompt.max_pixels).image_config
        sizes = []
        for image in prompt.images:
            if isinstance(image, (str, os.PathLike)):
                with Image.open(image) as im:  # reads the header only
                    width, height = im.size
            else:
                width, height = image.size
            sizes.append(smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels))
        return (len(sizes), tuple(sizes))

    def encode(self, prompt: Prompt) -> dict[str, np.ndarray]:
        proc = self._processor_for(prompt.min_pixels, prompt.max_pixels)
        return proc.encode_conversation(prompt.messages(), prompt.images, add_generation_prompt=True)

    def collate(self, rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Left-padded ``input_ids``/``attention_mask [B,T]`` and the rows' images concatenated in order. ``T`` is
        the prefill bucket of the longest row, so prompts of different lengths share compiled programs."""
        from infinitevl_jax.inference.engine import bucket_length

        T = bucket_length(max(len(r["input_ids"]) for r in rows), self.prefill_chunk)
        pad = self.processor.pad_token_id if self.processor.pad_token_id is not None else self.processor.eos_token_id
        ids = np.full((len(rows), T), pad, np.int32)
        mask = np.zeros((len(rows), T), np.int32)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[b, T - n:] = r["input_ids"]
            mask[b, T - n:] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        grids = [r["image_grid_thw"] for r in rows if len(r["image_grid_thw"])]
        if grids:
            batch["pixel_values"] = np.concatenate([r["pixel_values"] for r in rows if len(r["image_grid_thw"])])
            batch["image_grid_thw"] = np.concatenate(grids)
        return batch

    def __call__(self, prompts: list[Prompt]) -> list[str]:
        from infinitevl_jax.inference import generate

        batch = self.collate([self.encode(p) for p in prompts])
        if self._prepared is None:  # once: `generate` would copy the decoder blocks into per-block arrays per batch
            from infinitevl_jax.inference import engine

            self._prepared = engine.prepare(self.model)
        tokens = generate(self._prepared, batch, max_new_tokens=self.max_new_tokens, prefill_chunk=self.prefill_chunk,
                          stop_tokens=self.processor.stop_token_ids)
        return [self.processor.decode(t, skip_special_tokens=True).strip() for t in tokens]


# ------------------------------------------------------------------------------------------- several benchmarks


@dataclasses.dataclass
class EvalSpec:
    """One benchmark to run: its name and local data file (``image_root`` for VQA-JSON images elsewhere)."""

    benchmark: str
    data: str
    image_root: str | None = None


def evaluate_model(model, processor, specs: Sequence[EvalSpec], out: str, *, checkpoint: str | None = None,
                   batch_size: int = 8, limit: int | None = None, max_new_tokens: int | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None, progress: bool = True) -> dict:
    """Runs each benchmark of ``specs`` with ``model`` (resuming from the predictions next to ``out``), writes
    ``out`` (JSON) and its markdown table, and returns ``{benchmark: results}``."""
    import jax

    writer = jax.process_index() == 0
    results = {}
    for spec in specs:
        bench = get_benchmark(spec.benchmark)
        samples = read_samples(spec.data, spec.image_root)
        answer = ModelAnswerer(model, processor, max_new_tokens=max_new_tokens or bench.max_new_tokens)
        results[bench.name] = evaluate_benchmark(
            bench, samples, answer, predictions_file=predictions_path(out, bench), batch_size=batch_size,
            limit=limit, progress=progress, writer=writer, min_pixels=min_pixels, max_pixels=max_pixels)
        results[bench.name]["data"] = os.path.abspath(spec.data)
        if writer:  # after each benchmark, so a later failure keeps the finished ones
            write_results(out, {bench.name: results[bench.name]}, checkpoint)
    return results


class PeriodicEvaluator:
    """For a training loop: ``evaluator(step, model)`` runs the benchmarks every ``every`` steps (0: never, call
    ``evaluator.run`` at the end) into ``out_dir/step_<step>/results.json`` and returns ``{"<Benchmark>/score":
    value}`` for the metrics log (None on steps without evaluation)."""

    def __init__(self, processor, specs: Sequence[EvalSpec], out_dir: str, *, every: int = 0, limit: int | None = 100,
                 batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = False):
        self.processor, self.specs, self.out_dir = processor, list(specs), out_dir
        self.every, self.limit, self.batch_size = every, limit, batch_size
        self.max_new_tokens, self.progress = max_new_tokens, progress

    def __call__(self, step: int, model) -> dict[str, float] | None:
        if not self.every or step % self.every:
            return None
        return self.run(step, model)

    def run(self, step: int, model) -> dict[str, float]:
        out = os.path.join(self.out_dir, f"step_{step}", "results.json")
        results = evaluate_model(model, self.processor, self.specs, out, checkpoint=f"step {step}",
                                 batch_size=self.batch_size, limit=self.limit, max_new_tokens=self.max_new_tokens,
                                 progress=self.progress)
        return {f"{name}/score": r["score"] for name, r in results.items()}
