"""Evaluation: readers of tiny benchmark files, prompts, every metric against hand-computed values, resumable runs."""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image

from infinitevl_jax.evaluation import benchmarks, data, metrics, prompts, runner
from infinitevl_jax.evaluation.data import Sample


def _image(colour, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def write_tsv(path, rows: list[dict]) -> str:
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    return str(path)


# ------------------------------------------------------------------------------------------------- readers


def test_tsv_reader_images_options_hint_and_image_references(tmp_path):
    red, blue = data.encode_image(_image("red")), data.encode_image(_image("blue"), "JPEG")
    path = write_tsv(tmp_path / "mmbench.tsv", [
        {"index": "0", "question": "What colour?", "hint": "Look closely.", "A": "red", "B": "blue", "C": "", "D": "",
         "answer": "A", "category": "colour", "image": red},
        {"index": "1000000", "question": "What colour?", "hint": "nan", "A": "blue", "B": "red", "answer": "B",
         "category": "colour", "image": "0"},  # a short image field points at row 0's image
        {"index": "7", "question": "Which two?", "A": "x", "B": "y", "answer": "B",
         "image": json.dumps([red, blue]), "split": "dev"},
    ])
    s0, s1, s2 = data.read_tsv(path)
    assert (s0.id, s0.question, s0.hint, s0.category, s0.answer) == ("0", "What colour?", "Look closely.", "colour", "A")
    assert s0.options == {"A": "red", "B": "blue"}  # empty option columns are absent
    assert s0.images[0].size == (40, 30) and s0.images[0].convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert s1.hint is None and s1.options == {"A": "blue", "B": "red"}
    assert s1.images[0].convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    assert len(s2.images) == 2 and s2.meta == {"split": "dev"}
    r, g, b = s2.images[1].convert("RGB").getpixel((5, 5))
    assert b > 200 and r < 30  # JPEG round trip


def test_tsv_reader_list_answers_for_vqa_tsv(tmp_path):
    path = write_tsv(tmp_path / "textvqa.tsv", [
        {"index": "3", "question": "What brand?", "answer": "['nokia', 'Nokia', 'nokia']",
         "image": data.encode_image(_image("green"))}])
    (s,) = data.read_tsv(path)
    assert s.answers == ["nokia", "Nokia", "nokia"] and not s.options


def test_vqa_json_readers_textvqa_docvqa_chartqa(tmp_path):
    (tmp_path / "train_images").mkdir()
    _image("red").save(tmp_path / "train_images" / "abc.jpg")
    (tmp_path / "documents").mkdir()
    _image("white").save(tmp_path / "documents" / "d1.png")
    (tmp_path / "png").mkdir()
    _image("blue").save(tmp_path / "png" / "c1.png")
    textvqa = {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what is the brand?", "image_id": "abc", "answers": ["nokia"] * 10}]}
    docvqa = {"dataset_name": "docvqa", "data": [
        {"questionId": 9, "question": "What is the date?", "image": "documents/d1.png", "answers": ["1/2/99"],
         "question_types": ["form"]}]}
    chartqa = [{"imgname": "c1.png", "query": "What is the max?", "label": "42"},
               {"imgname": "c1.png", "query": "What is the min?", "label": "3"}]
    for name, obj in (("textvqa.json", textvqa), ("docvqa.json", docvqa), ("chartqa.json", chartqa)):
        (tmp_path / name).write_text(json.dumps(obj))
    (t,) = data.read_samples(tmp_path / "textvqa.json")
    assert (t.id, t.question, t.answers[0], len(t.answers)) == ("34602", "what is the brand?", "nokia", 10)
    assert t.images == [str(tmp_path / "train_images" / "abc.jpg")]
    (d,) = data.read_samples(tmp_path / "docvqa.json")
    assert (d.id, d.answers, d.images) == ("9", ["1/2/99"], [str(tmp_path / "documents" / "d1.png")])
    c = data.read_samples(tmp_path / "chartqa.json")
    assert [s.id for s in c] == ["0", "1"] and c[1].answers == ["3"] and c[0].question == "What is the max?"
    with pytest.raises(FileNotFoundError, match="missing"):
        (tmp_path / "bad.json").write_text(json.dumps([{"image": "missing.png", "query": "q", "label": "1"}]))
        data.read_samples(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------- prompts


def test_prompts_match_the_qwen2_vl_wrapper():
    s = Sample("1", "What colour?", images=["x"], options={"A": "red", "B": "blue"}, answers=["A"], hint="Be careful.")
    p = prompts.build_prompt(s, "mcq")
    assert p.text == ("Hint: Be careful.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
                      "Please select the correct answer from the options above.")
    assert p.user_content() == "<image>" + p.text
    assert (p.min_pixels, p.max_pixels) == (128 * 28 * 28, 2304 * 28 * 28)
    cn = Sample("2", "什么颜色?", options={"A": "红", "B": "蓝"}, answers=["A"])
    assert prompts.build_prompt(cn, "mcq").text.endswith("B. 蓝\n请直接回答选项字母。")
    assert prompts.build_prompt(cn, "mmmu").text.endswith("Please select the correct answer from the options above.")
    no_opts = Sample("3", "Describe.", images=["x", "y"])
    assert prompts.build_prompt(no_opts, "mcq").text == "Question: Describe."
    v = prompts.build_prompt(Sample("4", "what is written?", images=["x"]), "vqa")
    assert v.text == "what is written?\nPlease try to answer the question with short words or phrases if possible."
    assert prompts.build_prompt(Sample("5", "see <image> here"), "vqa").text.startswith("see <image > here")
    assert benchmarks.get_benchmark("OCRBench").min_pixels == 10 * 10 * 28 * 28


# ------------------------------------------------------------------------------------------------- metrics

OPTIONS = {"A": "cat", "B": "dog", "C": "black cat", "D": "bird"}


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is (B).", "B"), ("the answer is (b).", "B"),
    ("Answer: d", "D"), ("B. dog", "B"), ("I think the correct answer is C, because of the fur.", "C"),
    ("It is a dog.", "B"), ("The answer is a dog.", "B"), ("A is wrong; the answer is B because of the fur", "B"),
    ("answer is c", "C"), ("Option (D) fits best, not A.", "D"),  # no letter: the only option text that appears
    ("a black cat sits there", "C"),  # "cat" inside "black cat" does not count twice
    ("A or B", None), ("a cat and a dog", None), ("no idea", None), ("", None),
    ("(e)", None),  # not an option
])
def test_extract_choice(reply, expected):
    assert metrics.extract_choice(reply, OPTIONS) == expected


def test_circular_evaluation_and_rotation():
    ids = [0, 1_000_000, 2_000_000, 5, 1_000_005]
    groups = metrics.circular_groups(ids, [True, True, False, True, True])
    assert groups == {0: False, 5: True}
    rotated, ans = metrics.rotate_options({"A": "x", "B": "y", "C": "z"}, "B", 1)
    assert rotated == {"B": "x", "C": "y", "A": "z"} and ans == "C"
    bench = benchmarks.get_benchmark("MMBench_DEV_EN")
    samples = [Sample(str(i), "q", options={"A": "x", "B": "y"}, answers=[a], category="c")
               for i, a in zip(ids, ["A", "B", "A", "B", "A"])]
    preds = dict(zip([str(i) for i in ids], ["A", "B", "B", "B", "The answer is A"]))
    r = benchmarks.score(bench, samples, preds)
    assert r["vanilla_accuracy"] == 80.0 and r["score"] == 50.0 and r["questions"] == 2


def test_vqa_normalisation_and_accuracy():
    norm = metrics.normalize_vqa_answer
    assert norm("Two dogs!") == "2 dogs"
    assert norm("The Nokia.") == "nokia"
    assert norm("dont") == "don't" and norm("couldnt've") == "couldn't've"
    assert norm("yes/no") == "yes no" and norm("1,000") == "1000" and norm("3.5") == "3.5"
    assert norm("a\tcat\n") == "cat"
    # 10 human answers: leave-one-out average of min(1, agreeing others / 3).
    assert metrics.vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # (3*2/3 + 7*1) / 10
    assert metrics.vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)  # (2*1/3 + 8*2/3) / 10
    assert metrics.vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("4", ["2"] * 10) == 0.0
    assert metrics.vqa_accuracy("the nokia", ["Nokia"]) == 1.0  # one answer: exact after normalisation


def test_anls_thresholds():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.anls("1/2/99", ["1/2/99"]) == 1.0
    assert metrics.anls("  ITC  Limited ", ["itc limited"]) == 1.0  # case and whitespace
    assert metrics.anls("ab", ["ac"]) == 0.5  # similarity exactly at the threshold is kept
    assert metrics.anls("abc", ["axy"]) == 0.0  # 1 - 2/3 < 0.5
    assert metrics.anls("abcd", ["abce"]) == pytest.approx(0.75)
    assert metrics.anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)  # best ground truth
    assert metrics.anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)


def test_relaxed_accuracy():
    assert metrics.relaxed_correct("10.4", "10") and metrics.relaxed_correct("9.5", "10")
    assert not metrics.relaxed_correct("10.6", "10")
    assert metrics.relaxed_correct("52%", "0.5") and metrics.relaxed_correct("1,050", "1000")
    assert metrics.relaxed_correct("Yes", "yes") and not metrics.relaxed_correct("yes.", "no")
    assert metrics.relaxed_correct("0", "0") and not metrics.relaxed_correct("0.01", "0")
    assert metrics.relaxed_accuracy("42.", ["41", "100"]) == 1.0


def test_ocrbench_scoring():
    assert metrics.ocrbench_hit("The text says HELLO world", ["hello"], "Regular Text Recognition")
    assert not metrics.ocrbench_hit("hell", ["hello"], "Regular Text Recognition")
    math = metrics.OCRBENCH_MATH
    assert metrics.ocrbench_hit("x^{2} + y", ["x ^ { 2 } +y"], math)
    assert not metrics.ocrbench_hit("X^{2}+y", ["x^{2}+y"], math)  # case matters for formulas
    bench = benchmarks.get_benchmark("OCRBench")
    samples = [Sample("0", "q", answers=["cat"], category="Regular Text Recognition"),
               Sample("1", "q", answers=["dog"], category="Doc-oriented VQA"),
               Sample("2", "q", answers=["a+b"], category=math)]
    r = benchmarks.score(bench, samples, {"0": "A CAT", "1": "cow", "2": "a + b"})
    assert r["hits"] == 2 and r["score"] == pytest.approx(200 / 3)
    assert r["per_group_hits"] == {"Text Recognition": 1, "Doc-oriented VQA": 0,
                                   "Handwritten Mathematical Expression Recognition": 1}


def test_open_answers_mathvista_and_mmmu():
    mv = benchmarks.get_benchmark("MathVista_MINI")
    free = Sample("0", "q", answers=["1.45"], meta={"question_type": "free_form", "precision": "2.0"})
    mc = Sample("1", "q", answers=["blue"], meta={"question_type": "multi_choice", "choices": "['red', 'blue']"})
    r = benchmarks.score(mv, [free, mc], {"0": "So the value is about 1.449", "1": "The answer is (B)."})
    assert r["score"] == 100.0
    assert benchmarks.score(mv, [free, mc], {"0": "1.5", "1": "red"})["score"] == 0.0
    mmmu = benchmarks.get_benchmark("MMMU_DEV_VAL")
    s = [Sample("0", "q", options={"A": "x", "B": "y"}, answers=["B"]), Sample("1", "q", answers=["Paris"])]
    assert benchmarks.score(mmmu, s, {"0": "b", "1": "It is Paris."})["score"] == 100.0
    assert benchmarks.score(mmmu, s, {"0": "a", "1": "Lyon"})["score"] == 0.0


def test_vqa_benchmarks_scores_and_categories():
    samples = [Sample("0", "q", answers=["2"] * 3 + ["3"] * 7, category="x"),
               Sample("1", "q", answers=["nokia"] * 10, category="y")]
    r = benchmarks.score(benchmarks.get_benchmark("TextVQA"), samples, {"0": "two", "1": "Nokia"})
    assert r["score"] == pytest.approx(95.0) and r["per_category"] == {"x": 90.0, "y": 100.0}
    with pytest.raises(ValueError, match="no prediction"):
        benchmarks.score(benchmarks.get_benchmark("TextVQA"), samples, {"0": "two"})
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmarks.get_benchmark("NoSuchBench")


# ------------------------------------------------------------------------------------------------- runner


class _Interrupt(Exception):
    pass


def _fake_answers(replies: dict[str, str], calls: list, fail_after: int | None = None):
    def answer(batch):
        if fail_after is not None and len(calls) >= fail_after:
            raise _Interrupt
        calls.append([p.id for p in batch])
        assert all(p.images and p.text.startswith("Question:") for p in batch)
        return [replies[p.id] for p in batch]
    return answer


def test_runner_resumes_after_interruption_and_after_a_torn_line(tmp_path):
    red = data.encode_image(_image("red"))
    rows = [{"index": str(i), "question": f"q{i}", "A": "red", "B": "blue", "answer": "A" if i % 2 else "B",
             "image": red if i == 0 else "0", "category": "c"} for i in range(7)]
    samples = data.read_tsv(write_tsv(tmp_path / "mmstar.tsv", rows))
    replies = {str(i): ("A" if i < 4 else "The answer is (B).") for i in range(7)}
    out = str(tmp_path / "res" / "results.json")
    bench = benchmarks.get_benchmark("MMStar")
    preds = runner.predictions_path(out, bench)
    os.makedirs(os.path.dirname(out))
    calls = []
    with pytest.raises(_Interrupt):
        runner.evaluate_benchmark(bench, samples, _fake_answers(replies, calls, fail_after=2),
                                  predictions_file=preds, batch_size=2, progress=False)
    assert calls == [["0", "1"], ["2", "3"]]
    assert list(runner.read_predictions(preds)) == ["0", "1", "2", "3"]
    with open(preds, "a") as f:
        f.write('{"id": "4", "predic')  # a kill in the middle of a write
    calls.clear()
    r = runner.evaluate_benchmark(bench, samples, _fake_answers(replies, calls), predictions_file=preds,
                                  batch_size=2, progress=False)
    assert calls == [["4", "5"], ["6"]]  # nothing answered twice
    assert (r["resumed"], r["answered"], r["n"]) == (4, 3, 7)
    # right: 1, 3 (A), 4, 6 (B) -> 4/7
    assert r["score"] == pytest.approx(400 / 7, abs=1e-3)
    lines = open(preds).read().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [str(i) for i in range(7)]
    # A third run computes nothing; --limit keeps the first N.
    calls.clear()
    r2 = runner.evaluate_benchmark(bench, samples, _fake_answers(replies, calls), predictions_file=preds,
                                   limit=3, progress=False)
    assert calls == [] and r2["n"] == 3 and r2["resumed"] == 3
    merged = runner.write_results(out, {bench.name: r}, checkpoint="ckpt")
    runner.write_results(out, {"TextVQA": {"metric": "VQA accuracy", "score": 12.5, "n": 2, "limit": 2}})
    saved = json.load(open(out))
    assert saved["checkpoint"] == "ckpt" and set(saved["benchmarks"]) == {"MMStar", "TextVQA"}
    assert merged["benchmarks"]["MMStar"]["score"] == saved["benchmarks"]["MMStar"]["score"]
    md = open(str(tmp_path / "res" / "results.md")).read()
    assert "| MMStar | accuracy | 57.14 | 7 |  |" in md and "| TextVQA | VQA accuracy | 12.50 | 2 (limit 2) | 78.5 |" in md


def test_periodic_evaluator_for_training(tmp_path, monkeypatch):
    red = data.encode_image(_image("red"))
    tsv = write_tsv(tmp_path / "ai2d.tsv", [{"index": str(i), "question": "q", "A": "red", "B": "blue", "answer": "A",
                                             "image": red} for i in range(3)])
    seen = []

    class FakeAnswerer:
        def __init__(self, model, processor, *, max_new_tokens):
            self.model = model
            seen.append(max_new_tokens)

        def __call__(self, prompts):
            return ["A" if self.model == "good" else "B"] * len(prompts)

    monkeypatch.setattr(runner, "ModelAnswerer", FakeAnswerer)
    ev = runner.PeriodicEvaluator(None, [runner.EvalSpec("AI2D_TEST", tsv)], str(tmp_path / "evals"), every=10, limit=2)
    assert ev(5, "good") is None
    assert ev(10, "good") == {"AI2D/score": 100.0}
    assert ev(20, "bad") == {"AI2D/score": 0.0}
    saved = json.load(open(tmp_path / "evals" / "step_20" / "results.json"))
    assert saved["checkpoint"] == "step 20" and saved["benchmarks"]["AI2D"]["n"] == 2
    assert seen == [128, 128]


def test_runner_groups_questions_by_batch_key(tmp_path):
    samples = [Sample(str(i), f"q{i}", images=[_image("red", (40 + 10 * (i % 2), 30))], options={"A": "x"},
                      answers=["A"]) for i in range(4)]
    calls = []

    def answer(batch):
        calls.append([p.id for p in batch])
        return ["A"] * len(batch)

    answer.batch_key = lambda p: p.images[0].size  # what ModelAnswerer.batch_key computes from the resized grid
    r = runner.evaluate_benchmark("MMStar", samples, answer, predictions_file=str(tmp_path / "p.jsonl"),
                                  batch_size=2, progress=False)
    assert calls == [["0", "2"], ["1", "3"]] and r["score"] == 100.0
    from infinitevl_jax.evaluation.runner import ModelAnswerer

    class _Proc:
        from infinitevl_jax.processing import ImageProcessorConfig
        image_config = ImageProcessorConfig()

    key = ModelAnswerer(None, _Proc()).batch_key
    p = prompts.build_prompt(samples[0], "mcq", min_pixels=56 * 56, max_pixels=112 * 112)
    assert key(p) == (1, ((56, 84),))  # 30x40 grown to >= 56*56 pixels in multiples of 28
