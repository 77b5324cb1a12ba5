"""``infinitevl eval`` end to end on a tiny random checkpoint: killed half-way (SIGKILL), resumed, consistent results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from infinitevl_jax.evaluation import benchmarks, data, runner
from test_evaluation import write_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_random_checkpoint(path: str) -> str:
    """Random N(0, 0.02) parameters (drawn in numpy: faster than initialising the modules) and a tiny tokenizer."""
    from flax import nnx

    from infinitevl_jax import checkpoint
    from infinitevl_jax.config import tiny_infinitevl
    from infinitevl_jax.processing.testing import write_tiny_processor_dir

    config = tiny_infinitevl()
    graphdef, state = nnx.split(checkpoint.abstract_model(config))
    rng = np.random.default_rng(0)
    flat = [(p, v.replace(np.asarray(rng.normal(0.0, 0.02, v.shape), v.dtype))) for p, v in nnx.to_flat_state(state)]
    checkpoint.save(path, nnx.merge(graphdef, nnx.from_flat_state(flat)))
    write_tiny_processor_dir(path, config)
    return path


def _write_data(root) -> tuple[str, str]:
    image = Image.new("RGB", (64, 48), "red")  # one image size: the vision tower compiles once
    rows = [{"index": str(i), "question": "What colour is the shape?", "A": "red", "B": "blue", "answer": "AB"[i % 2],
             "image": data.encode_image(image) if i == 0 else "0", "category": "colour"} for i in range(4)]
    tsv = write_tsv(os.path.join(root, "MMBench_DEV_EN.tsv"), rows)
    os.makedirs(os.path.join(root, "train_images"))
    image.save(os.path.join(root, "train_images", "im0.jpg"))
    records = [{"question_id": 100 + i, "question": "what is written?", "image_id": "im0", "answers": ["red"] * 10}
               for i in range(4)]
    vqa = os.path.join(root, "TextVQA_0.5.1_val.json")
    with open(vqa, "w") as f:
        json.dump({"dataset_name": "textvqa", "data": records}, f)
    return tsv, vqa


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


def test_eval_cli_killed_and_resumed(tmp_path):
    ckpt = _tiny_random_checkpoint(str(tmp_path / "ckpt"))
    tsv, vqa = _write_data(str(tmp_path))
    out = str(tmp_path / "eval" / "results.json")
    cmd = [sys.executable, "-m", "infinitevl_jax.cli", "eval", "--ckpt", ckpt, "--benchmark", "MMBench", "--data", tsv,
           "--benchmark", "TextVQA", "--data", vqa, "--out", out, "--batch-size", "2", "--max-new-tokens", "6",
           "--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112), "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # the resumed run reuses the first run's compiled programs
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    mmb = runner.predictions_path(out, benchmarks.get_benchmark("MMBench"))
    tvqa = runner.predictions_path(out, benchmarks.get_benchmark("TextVQA"))

    # Run 1: killed once the first TextVQA batch is on disk (MMBench done, TextVQA half done).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and _lines(tvqa) < 2 and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    log = proc.communicate()[0]
    assert _lines(mmb) == 4 and _lines(tvqa) >= 2, log
    if _lines(tvqa) == 4:  # the run beat the poll: put the files back in the state a kill leaves
        with open(tvqa) as f:
            kept = f.readlines()[:2]
        with open(tvqa, "w") as f:
            f.writelines(kept)
        if os.path.exists(out):
            os.remove(out)
    with open(tvqa, "a") as f:
        f.write('{"id": "103", "predi')  # the kill can also land inside a write
    before_mmb, before_tvqa = open(mmb).read(), open(tvqa).read()
    answered_before = len(runner.read_predictions(tvqa))
    assert 1 <= answered_before < 4
    if os.path.exists(out):
        assert set(json.load(open(out))["benchmarks"]) == {"MMBench"}  # written after each finished benchmark

    # Run 2: resumes.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| TextVQA | VQA accuracy |" in proc.stdout

    results = json.load(open(out))
    assert results["checkpoint"] == os.path.abspath(ckpt)
    r_mmb, r_tvqa = results["benchmarks"]["MMBench"], results["benchmarks"]["TextVQA"]
    assert (r_mmb["n"], r_mmb["resumed"], r_mmb["answered"]) == (4, 4, 0)
    assert (r_tvqa["n"], r_tvqa["resumed"], r_tvqa["answered"]) == (4, answered_before, 4 - answered_before)
    # Earlier answers are kept verbatim, the torn line is gone, every question is answered once.
    assert open(mmb).read() == before_mmb
    after = open(tvqa).read()
    assert after.startswith(before_tvqa[:before_tvqa.rindex("\n") + 1]) and '"predi"' not in after
    ids = [json.loads(line)["id"] for line in after.splitlines()]
    assert sorted(ids) == ["100", "101", "102", "103"]
    # The results agree with a rescoring of the predictions files.
    for name, path, records in (("MMBench", mmb, tsv), ("TextVQA", tvqa, vqa)):
        rescored = benchmarks.score(benchmarks.get_benchmark(name), data.read_samples(records),
                                    runner.read_predictions(path))
        assert rescored["score"] == results["benchmarks"][name]["score"]
        assert rescored["n"] == results["benchmarks"][name]["n"]
    md = open(os.path.join(os.path.dirname(out), "results.md")).read()
    assert "| MMBench | circular accuracy |" in md and "| TextVQA | VQA accuracy |" in md
