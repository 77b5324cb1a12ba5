"""Readers for benchmark files on local disk (nothing is downloaded).

Two public formats:

- VLMEvalKit TSV (MMBench, MMStar, SEED-Bench, ScienceQA, RealWorldQA, AI2D, MathVista, OCRBench, MMMU, and also
  TextVQA/DocVQA/ChartQA): one row per question with ``index``, ``question``, base64 ``image`` (a JPEG/PNG, a
  Python/JSON list of them for multi-image rows, or - for a repeated image - the ``index`` of the row that holds
  it), option columns ``A``, ``B``, ... (empty when absent), ``answer`` (a letter, a string, or a list literal) and
  optional ``hint``, ``category``, ``l2-category``, ``split``, ``question_type``, ``answer_type``, ``precision``.
- VQA-style JSON: TextVQA (``{"data": [{"question_id", "question", "image_id", "answers": [10]}]}``, images at
  ``<image_id>.jpg``), DocVQA (``{"data": [{"questionId", "question", "image": "documents/x.png", "answers"}]}``),
  ChartQA (``[{"imgname", "query", "label"}]``, images in ``png/``). Images are looked up relative to the JSON
  file's directory, its ``images``/``png``/``train_images``/``documents`` subfolders, or an explicit image root.
"""

from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import io
import json
import os
import string
import sys
from typing import Any, Sequence

from PIL import Image

OPTION_LETTERS = tuple(string.ascii_uppercase)


@dataclasses.dataclass
class Sample:
    """One benchmark question. ``images`` holds PIL images or file paths, in prompt order."""

    id: str
    question: str
    images: list = dataclasses.field(default_factory=list)
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    answers: list[str] = dataclasses.field(default_factory=list)  # the answer letter for multiple choice
    hint: str | None = None
    category: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def decode_image(data: str | bytes) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def encode_image(image: Image.Image, fmt: str = "PNG") -> str:
    """Base64 text of ``image`` as stored in a VLMEvalKit TSV (used to build test files)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_list(value: str) -> list[str] | None:
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            out = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(out, list):
            return [str(x) for x in out]
    return None


def read_tsv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_tsv(path: str | os.PathLike) -> list[Sample]:
    """Samples of a VLMEvalKit-style TSV (see the module docstring)."""
    rows = read_tsv_rows(path)
    by_index = {str(r.get("index", i)): r for i, r in enumerate(rows)}
    samples = []
    for i, row in enumerate(rows):
        idx = str(row.get("index", i)).strip()
        samples.append(_tsv_sample(idx, row, by_index))
    return samples


def _tsv_images(row: dict[str, str], by_index: dict[str, dict[str, str]]) -> list[Image.Image]:
    value = row.get("image")
    seen = set()
    # A short image field is a reference to the row that stores the image (VLMEvalKit de-duplicates images).
    while not _missing(value) and len(value) <= 64 and value.strip() in by_index and value.strip() not in seen:
        seen.add(value.strip())
        value = by_index[value.strip()].get("image")
    if _missing(value):
        path = row.get("image_path")
        return [] if _missing(path) else [p for p in (parse_list(path) or [path]) if os.path.exists(p)]
    items = parse_list(value) or [value]
    return [decode_image(item) for item in items]


def _tsv_sample(idx: str, row: dict[str, str], by_index) -> Sample:
    options = {k: row[k].strip() for k in OPTION_LETTERS if k in row and not _missing(row[k])}
    answer = row.get("answer", "")
    answers = [] if _missing(answer) else (parse_list(answer) or [answer.strip()])
    hint = None if _missing(row.get("hint")) else row["hint"].strip()
    category = next((row[k].strip() for k in ("category", "l2-category", "task") if not _missing(row.get(k))), None)
    known = {"index", "image", "image_path", "question", "answer", "hint", *OPTION_LETTERS}
    meta = {k: v for k, v in row.items() if k not in known and not _missing(v)}
    return Sample(id=idx, question=row.get("question", "").strip(), images=_tsv_images(row, by_index),
                  options=options, answers=answers, hint=hint, category=category, meta=meta)


_IMAGE_SUBDIRS = ("", "images", "png", "train_images", "test_images", "documents")


def _find_image(name: str, roots: Sequence[str]) -> str:
    candidates = [name] if os.path.splitext(name)[1] else [name + ext for ext in (".jpg", ".png", ".jpeg")]
    for root in roots:
        for sub in _IMAGE_SUBDIRS:
            for c in candidates:
                p = os.path.join(root, sub, c)
                if os.path.exists(p):
                    return p
    raise FileNotFoundError(f"image {name!r} not found under {list(roots)} (subfolders {_IMAGE_SUBDIRS[1:]})")


def read_vqa_json(path: str | os.PathLike, image_root: str | None = None) -> list[Sample]:
    """Samples of a TextVQA / DocVQA / ChartQA style JSON (or JSON-lines) file (see the module docstring)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    records = data.get("data", data.get("annotations")) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records or a dict with 'data'")
    roots = [r for r in (image_root, os.path.dirname(os.path.abspath(path))) if r]
    samples = []
    for i, r in enumerate(records):
        qid = next((r[k] for k in ("question_id", "questionId", "id", "index") if k in r), i)
        question = next((r[k] for k in ("question", "query") if k in r), None)
        if question is None:
            raise ValueError(f"{path}: record {i} has no 'question' or 'query'")
        answers = next((r[k] for k in ("answers", "answer", "label") if k in r), [])
        answers = [str(a) for a in answers] if isinstance(answers, list) else [str(answers)]
        image = next((r[k] for k in ("image", "imgname", "image_path", "image_id") if k in r), None)
        images = [] if image is None else [_find_image(str(image), roots)]
        category = next((str(r[k]) for k in ("question_types", "category", "type") if k in r and r[k]), None)
        samples.append(Sample(id=str(qid), question=str(question).strip(), images=images, answers=answers,
                              category=category))
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):  # ChartQA has no ids: number the records instead
        for i, s in enumerate(samples):
            s.id = str(i)
    return samples


def read_samples(path: str | os.PathLike, image_root: str | None = None) -> list[Sample]:
    """TSV by extension ``.tsv``, else VQA-style JSON."""
    if os.fspath(path).lower().endswith(".tsv"):
        return read_tsv(path)
    return read_vqa_json(path, image_root)
