"""Prompts as VLMEvalKit's Qwen2-VL wrapper builds them: images first, then the text, in one user turn.

- Multiple choice (and MMMU): ``Hint: ...`` (when there is one), ``Question: ...``, ``Options:`` with one
  ``X. text`` line per option, then the instruction to pick an option (Chinese when the text has CJK characters);
  the whole is right-stripped.
- VQA (TextVQA, DocVQA, ChartQA, OCRBench, MathVista): the question, a newline, and a request for a short answer.

Images are processed with min/max pixels 128*28*28 / 2304*28*28 (OCRBench: min 10*10*28*28, as the wrapper).
"""

from __future__ import annotations

import dataclasses
import re

from infinitevl_jax.evaluation.data import Sample

MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 2304 * 28 * 28
OCRBENCH_MIN_PIXELS = 10 * 10 * 28 * 28

MCQ_INSTRUCTION_EN = "Please select the correct answer from the options above."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"
VQA_INSTRUCTION = "\nPlease try to answer the question with short words or phrases if possible."
IMAGE_PLACEHOLDER = "<image>"


@dataclasses.dataclass
class Prompt:
    """One model request: ``text`` (without image placeholders), its ``images`` and their pixel limits."""

    id: str
    text: str
    images: list
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def user_content(self) -> str:
        """The user turn for ``Processor.encode_conversation``: one ``<image>`` per image, then the text."""
        return IMAGE_PLACEHOLDER * len(self.images) + self.text

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.user_content()}]


def _has_cjk(text: str) -> bool:
    return re.search("[\u4e00-\u9fff]", text) is not None


def multiple_choice_text(sample: Sample, chinese_instruction: bool = True) -> str:
    text = f"Hint: {sample.hint}\n" if sample.hint else ""
    text += f"Question: {sample.question}\n"
    if sample.options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in sample.options.items())
        text += MCQ_INSTRUCTION_CN if chinese_instruction and _has_cjk(text) else MCQ_INSTRUCTION_EN
    return text.rstrip()


def vqa_text(sample: Sample) -> str:
    return sample.question + VQA_INSTRUCTION


def build_prompt(sample: Sample, style: str, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Prompt:
    """``style``: ``"mcq"``, ``"mmmu"`` (multiple choice, English instruction only) or ``"vqa"``."""
    if style == "mcq":
        text = multiple_choice_text(sample)
    elif style == "mmmu":
        text = multiple_choice_text(sample, chinese_instruction=False)
    elif style == "vqa":
        text = vqa_text(sample)
    else:
        raise ValueError(f"unknown prompt style {style!r}")
    # A literal placeholder inside benchmark text would be taken for an image.
    text = text.replace(IMAGE_PLACEHOLDER, "<image >")
    return Prompt(sample.id, text, list(sample.images), min_pixels, max_pixels)
