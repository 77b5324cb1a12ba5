"""Benchmark metrics: pure Python over strings, one function per official rule.

- ``extract_choice``: the option letter a free-text reply commits to (no LLM judge: rules only, ``None`` when the
  reply names no option or several).
- ``vqa_accuracy``: VQA v2 / TextVQA accuracy over 10 human answers, min(1, #humans agreeing / 3) averaged over the
  ten leave-one-out subsets, after the VQA answer normalisation (``normalize_vqa_answer``).
- ``anls``: average normalised Levenshtein similarity (DocVQA): 1 - edit distance / longer length against the best
  ground truth, kept when >= the threshold (0.5), else 0.
- ``relaxed_accuracy``: ChartQA: numbers within 5% of the target (relative), other answers exact (case-insensitive).
- ``ocrbench_hit``: OCRBench: the ground truth appears inside the reply (case-insensitive; for handwritten
  mathematical expressions whitespace is removed and case kept).
- ``circular_groups``: MMBench circular evaluation, a question counts only if every rotation of its options is right.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

# --------------------------------------------------------------------------------------------- multiple choice

_MARKER = r"(?i:answer|option|choice)\s*(?i:is|:|-|would be|should be)?\s*(?i:option\s*)?"
# A lower-case letter after "answer is" must end the clause: "the answer is a dog" names no option.
_LETTER_PATTERNS = (
    _MARKER + r"[\(\[]?\s*([A-Z])\s*[\)\]]?(?![A-Za-z])",  # "Answer: B because ..."
    _MARKER + r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=\s*(?:[\.,;:!\)\]]|$))",  # "the answer is b."
    r"[\(\[]\s*([A-Za-z])\s*[\)\]]",  # "(b)", "[C]"
    r"^\s*([A-Za-z])\s*[\.\):](?![A-Za-z0-9])",  # "B." / "b)" at the very start
)


def extract_choice(reply: str, options: Mapping[str, str]) -> str | None:
    """The option letter (a key of ``options``) that ``reply`` selects, or None.

    Rules, in order: the whole reply is one letter (any case, with punctuation or brackets around it); exactly one
    option letter stands alone in upper case (``"B"``, ``"B. cat"``, ``"I think C is right"``); an explicit marker in
    any case (``"the answer is (b)."``, ``"(c)"``, ``"answer: d"``), the last such marker winning; exactly one option's
    text (case-insensitive) appears in the reply, a longer text hiding the shorter texts it contains.
    """
    letters = [k.upper() for k in options]
    text = reply.strip()
    if not text:
        return None
    bare = re.sub(r"^[\s\(\[\"'*]+|[\s\)\]\.\"'*:,!]+$", "", text)
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    # Upper-case letters standing alone; lower-case single letters are ambiguous in English ("a", "I").
    standalone = {m for m in re.findall(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])", text) if m in letters}
    if len(standalone) == 1:
        return standalone.pop()
    marked = []
    for pattern in _LETTER_PATTERNS:
        for m in re.finditer(pattern, text):
            if m.group(1).upper() in letters:
                marked.append((m.start(1), m.group(1).upper()))
    if marked:
        return max(marked)[1]
    if standalone:
        return None  # several letters and no marker saying which one
    lowered = text.lower()
    found = {k.upper(): str(v).strip().lower() for k, v in options.items()
             if str(v).strip() and str(v).strip().lower() in lowered}
    # A match that is part of a longer matching option ("cat" inside "black cat") does not count.
    found = {k: v for k, v in found.items() if not any(v != w and v in w for w in found.values())}
    if len(found) == 1:
        return next(iter(found))
    return None


def multiple_choice_correct(reply: str, options: Mapping[str, str], answer: str) -> bool:
    return extract_choice(reply, options) == str(answer).strip().upper()


def circular_groups(ids: Sequence[int], correct: Sequence[bool], stride: int = 1_000_000) -> dict[int, bool]:
    """MMBench circular evaluation: rows whose index differs by multiples of ``stride`` are rotations of one
    question (VLMEvalKit's TSVs number rotation k of question i as ``i + k * 1e6``). Returns {question: all right}."""
    groups: dict[int, bool] = {}
    for i, ok in zip(ids, correct):
        g = int(i) % stride
        groups[g] = groups.get(g, True) and bool(ok)
    return groups


def rotate_options(options: Mapping[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Options moved ``shift`` places (A's text goes to B, ...) and the letter of the answer after the move."""
    keys = list(options)
    values = [options[k] for k in keys]
    n = len(keys)
    rotated = {keys[(j + shift) % n]: values[j] for j in range(n)}
    return rotated, keys[(keys.index(answer) + shift) % n]


# --------------------------------------------------------------------------------------------- VQA accuracy

# Contractions written without apostrophes map back to their spelling with them. The table is built from the
# canonical spellings: the key drops every apostrophe (and for double contractions also just one of them).
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's I'd I'd've I'll I'm I've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've she'll she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll something's that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd we'd've we'll we're we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTIONS:
        table[word.replace("'", "")] = word
        parts = word.split("'")
        if len(parts) == 3:  # "couldn't've": accept "couldnt've" and "couldn'tve" too
            table[parts[0] + parts[1] + "'" + parts[2]] = word
            table[parts[0] + "'" + parts[1] + parts[2]] = word
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _strip_punctuation(text: str) -> str:
    # A mark touching a space, or any text with a digit group comma ("1,000"), loses the mark; elsewhere the mark
    # becomes a space ("yes/no" -> "yes no"). Periods go unless they are decimal points.
    out = text
    numeric_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or numeric_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: newlines/tabs to spaces, punctuation, lower case, number words to
    digits, articles dropped, apostrophe-less contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(text))


def vqa_accuracy(reply: str, answers: Sequence[str]) -> float:
    """Mean over each human answer left out of min(1, matches among the others / 3) (VQA v2 / TextVQA)."""
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(reply)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_text(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(reply: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Best normalised Levenshtein similarity to any ground truth; similarities below ``threshold`` score 0."""
    pred = _anls_text(reply)
    best = 0.0
    for gt in answers:
        gt = _anls_text(gt)
        longest = max(len(pred), len(gt))
        sim = 1.0 if longest == 0 else 1.0 - levenshtein(pred, gt) / longest
        best = max(best, sim)
    return best if best >= threshold else 0.0


# --------------------------------------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1].strip().replace(",", "")) / 100.0
        return float(text.replace(",", ""))
    except ValueError:
        return None


def relaxed_correct(reply: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy: numbers may differ from the target by ``tolerance`` of it; text must match."""
    reply = reply.strip().rstrip(".")
    p, t = _to_float(reply), _to_float(target)
    if p is not None and t is not None:
        if t == 0.0:
            return p == 0.0
        return abs(p - t) / abs(t) <= tolerance
    return reply.lower() == target.strip().lower()


def relaxed_accuracy(reply: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    return float(any(relaxed_correct(reply, a, tolerance) for a in answers))


# --------------------------------------------------------------------------------------------- OCRBench

OCRBENCH_MATH = "Handwritten Mathematical Expression Recognition"
OCRBENCH_GROUPS = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                         "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    "Handwritten Mathematical Expression Recognition": (OCRBENCH_MATH,),
}


def ocrbench_hit(reply: str, answers: Sequence[str], category: str = "") -> bool:
    if category == OCRBENCH_MATH:
        pred = re.sub(r"\s+", "", reply)
        return any(re.sub(r"\s+", "", a) in pred for a in answers if a.strip())
    pred = reply.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in pred for a in answers if a.strip())


# --------------------------------------------------------------------------------------------- free-form answers


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    for s in reversed(found):
        try:
            return float(s.replace(",", ""))
        except ValueError:
            continue
    return None


def open_answer_correct(reply: str, answers: Iterable[str], precision: int | None = None) -> bool:
    """Rule-based scoring of a free-form answer (MathVista / MMMU open questions, without an LLM extractor): numeric
    targets compare with the reply's last number (rounded to ``precision`` decimals when given, else within 1e-6
    relative), text targets must appear in the reply after VQA normalisation."""
    for a in answers:
        a = str(a).strip()
        t = _to_float(a)
        if t is not None:
            p = last_number(reply)
            if p is None:
                continue
            if precision is not None:
                if round(p, precision) == round(t, precision):
                    return True
            elif abs(p - t) <= 1e-6 * max(1.0, abs(t)):
                return True
        else:
            na, nr = normalize_vqa_answer(a), normalize_vqa_answer(reply)
            if na and (na == nr or re.search(r"(?<!\w)" + re.escape(na) + r"(?!\w)", nr)):
                return True
    return False
