"""The ``generate``/``stream`` subcommands on a saved tiny checkpoint, and the Colab notebook executed on CPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax import checkpoint, cli
from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.modeling.model import InfiniteVLForConditionalGeneration
from infinitevl_jax.processing.testing import write_tiny_processor_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "tiny")
    model = InfiniteVLForConditionalGeneration(tiny_infinitevl(), rngs=nnx.Rngs(0))
    checkpoint.save(path, model)
    write_tiny_processor_dir(path, model.config, min_pixels=28 * 28, max_pixels=56 * 56)
    return path


@pytest.mark.slow
def test_generate_and_stream_commands(ckpt, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (56, 56, 3), np.uint8)).save(img)
    assert cli.main(["generate", "--ckpt", ckpt, "--image", str(img), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (28, 28, 3), np.uint8)).save(frames / f"{i:03d}.png")
    assert cli.main(["stream", "--ckpt", ckpt, "--video", str(frames), "--ask-at", "1:what?", "--ask-at",
                     "9:and now?", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[1.0s, 3 frames] what?" in out and "[9.0s, 5 frames] and now?" in out


def test_colab_notebook_runs_on_cpu():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "colab_inference.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
