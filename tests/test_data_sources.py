"""Mixtures, ArrayRecord sources, and the grain-free import of processing/data."""

import json
import subprocess
import sys

import numpy as np
import pytest

from infinitevl_jax.config import tiny_infinitevl
from infinitevl_jax.data import DataConfig, SourceConfig, make_data_iterator
from infinitevl_jax.processing import IGNORE_INDEX, Processor
from infinitevl_jax.processing.testing import write_tiny_processor_dir

pytest.importorskip("grain")


def _text_records(answer, n):
    return [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_tiny_processor_dir(tmp_path_factory.mktemp("proc"), tiny_infinitevl()))


def _answers(batch, processor):
    out = []
    for b in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][b].max() + 1):
            lab = batch["labels"][b][batch["segment_ids"][b] == s]
            out.append(processor.decode(lab[lab != IGNORE_INDEX]).replace("<|im_end|>\n", ""))
    return out


def test_weighted_mixture(processor, tmp_path):
    for name, answer in (("a", "red"), ("b", "blue")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _text_records(answer, 10)))
    cfg = DataConfig(sources=(SourceConfig(str(tmp_path / "a.jsonl"), weight=3.0),
                              SourceConfig(str(tmp_path / "b.jsonl"), weight=1.0)),
                     batch_size=2, seq_len=128, num_epochs=None)
    it = make_data_iterator(cfg, processor)
    answers = []
    while len(answers) < 80:
        answers += _answers(next(it), processor)
    counts = {a: answers[:80].count(a) for a in ("red", "blue")}
    assert counts["red"] + counts["blue"] == 80 and abs(counts["red"] - 60) <= 4, counts


def test_array_record_source(processor, tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    writer = ar.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for r in _text_records("green", 5):
        writer.write(json.dumps(r).encode())
    writer.write(b"{not json")
    writer.close()
    cfg = DataConfig(sources=(SourceConfig(str(tmp_path / "d.array_record"), kind="arrayrecord",
                                           media_root=str(tmp_path)),), batch_size=1, seq_len=256, shuffle=False)
    it = make_data_iterator(cfg, processor)
    answers = [a for b in it for a in _answers(b, processor)]
    assert answers == ["green"] * 5 and dict(it.skipped) == {"malformed_json": 1}
    assert it.skip_log[0].line == 6


def test_processing_and_data_import_without_grain():
    code = ("import sys, infinitevl_jax.processing, infinitevl_jax.data, infinitevl_jax.data.synthetic; "
            "assert 'grain' not in sys.modules, 'grain imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
