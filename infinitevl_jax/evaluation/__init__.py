"""Standard VLM benchmarks from local files: readers, VLMEvalKit-style prompts, official metrics, resumable runs.

``infinitevl eval --ckpt DIR --benchmark NAME --data PATH [--limit N] [--out results.json]`` is the command line;
``evaluate_model`` / ``PeriodicEvaluator`` the library entry points (the latter for a training loop).
"""

from infinitevl_jax.evaluation.benchmarks import BENCHMARKS, Benchmark, get_benchmark, score
from infinitevl_jax.evaluation.data import Sample, read_samples, read_tsv, read_vqa_json
from infinitevl_jax.evaluation.prompts import Prompt, build_prompt
from infinitevl_jax.evaluation.runner import (
    EvalSpec, ModelAnswerer, PeriodicEvaluator, evaluate_benchmark, evaluate_model, read_predictions, write_results,
)

__all__ = [
    "BENCHMARKS", "Benchmark", "EvalSpec", "ModelAnswerer", "PeriodicEvaluator", "Prompt", "Sample", "build_prompt",
    "evaluate_benchmark", "evaluate_model", "get_benchmark", "read_predictions", "read_samples", "read_tsv",
    "read_vqa_json", "score", "write_results",
]
