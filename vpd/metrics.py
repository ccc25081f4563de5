"""Answer normalization and the metrics of the field: one place, below every stage.

``vpd verify`` keeps programs with them, ``vpd eval`` scores VLM answers, ``vpd rationalize``
and the LLM judge compare answers with them.

- Normalization follows the official VQA evaluation script (vqaEval.py): newline /
  tab to space, punctuation removed or spaced (removed outright when the text has a
  "digit,digit" number like ``1,000``), periods removed unless followed by a digit
  (so ``3.5`` survives), lower-case, number words ``zero..ten`` (and ``none``) to
  digits, articles a/an/the dropped, the official contractions map. Unlike the
  official script, which normalizes only when the 10 human answers disagree, we
  always normalize both prediction and human answers: identical results on VQA v2
  for normalized predictions, and robust for raw program output.
- VQA accuracy: mean over the n leave-one-out subsets of ``min(1, matches / 3)``
  (n = 10 on VQA v2). For fewer answers we keep the leave-one-out form but need
  ``min(3, n - 1)`` matches for full credit; a single answer is plain exact match.
- Default keep thresholds: 1.0 for exact/count/yesno/mc; 0.3 for VQA, which is
  exactly "agrees with at least one of the 10 annotators" (9 of 10 subsets hold
  that annotator: 0.9 * 1/3 = 0.3).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from vpd.errors import VpdError
from vpd.records import Question

Metric = Literal["auto", "vqa", "exact", "count", "yesno", "mc"]
METRICS: tuple[str, ...] = ("vqa", "exact", "count", "yesno", "mc")

DEFAULT_THRESHOLDS: dict[str, float] = {
    "vqa": 0.3,  # = at least one of 10 annotators agrees (see module docstring)
    "exact": 1.0,
    "count": 1.0,
    "yesno": 1.0,
    "mc": 1.0,
}

# ----------------------------------------------------------------------------- VQA normalization
# Tables from the official VQA v2 evaluation script (vqaEval.py), kept verbatim
# (including its capitalized keys, which never match after lower-casing) so scores
# agree with published numbers.

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")  # fmt: skip
# The official pattern "(?!<=\d)(\.)(?!\d)": its first group is a (buggy) lookahead that
# never matches before a ".", so in effect: a period not followed by a digit.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # Punctuation next to a space (or any text with a 1,000-style number) is dropped;
        # otherwise it separates words ("red-white" -> "red white").
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _MANUAL_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(s: Any) -> str:
    """Official VQA v2 answer normalization (see module docstring); ``None`` -> ``""``."""
    if s is None:
        return ""
    text = str(s).replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


# ----------------------------------------------------------------------------- metrics


def vqa_accuracy(pred: Any, answers: list[str]) -> float:
    """VQA accuracy: mean over leave-one-out subsets of ``min(1, matches / 3)``.

    With n < 10 answers a full credit needs ``min(3, n - 1)`` matches among the other
    n - 1; with one answer it is exact match. No answers -> 0.
    """
    n = len(answers)
    if n == 0:
        return 0.0
    p = normalize_answer(pred)
    if not p:
        return 0.0
    hits = [normalize_answer(a) == p for a in answers]
    if n == 1:
        return float(hits[0])
    need = min(3, n - 1)
    total = sum(hits)
    # Leaving out answer i removes one match iff answer i matched.
    acc = sum(min(1.0, (total - h) / need) for h in hits)
    return acc / n


def exact_match(pred: Any, answers: list[str]) -> float:
    """GQA-style: 1 if the normalized prediction equals any normalized answer."""
    p = normalize_answer(pred)
    return float(bool(p) and any(p == normalize_answer(a) for a in answers))


_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
}


def to_number(s: Any) -> float | None:
    """Parse ``"3"``, ``"3.0"``, ``"1,000"``, ``"three"``, ``"twenty-one"``; else ``None``."""
    if s is None:
        return None
    if isinstance(s, bool):
        return None
    if isinstance(s, int | float):
        return float(s)
    text = normalize_answer(s)
    if not text:
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        pass
    words = text.split()
    total = 0
    for i, w in enumerate(words):
        if w in _TENS and i == 0:
            total += _TENS[w]
        elif w in _UNITS and (i == 0 or (i == 1 and words[0] in _TENS and _UNITS[w] < 10)):
            total += _UNITS[w]
        elif w.isdigit() and i == 1 and words[0] in _TENS and int(w) < 10:
            total += int(w)  # "twenty 1" (the manual map turned "one" into "1")
        else:
            return None
    return float(total)


def count_match(pred: Any, answers: list[str]) -> float:
    """1 if the prediction is the same number as any answer ("3" == "three" == "3.0")."""
    p = to_number(pred)
    if p is None:
        return 0.0
    return float(any(to_number(a) == p for a in answers))


_YES = frozenset({"yes", "y", "true", "yeah", "yep", "correct"})
_NO = frozenset({"no", "n", "false", "nope", "incorrect"})


def to_yesno(s: Any) -> str | None:
    """Map yes/no/true/false/y/n (any case, punctuation) to ``"yes"``/``"no"``; else None."""
    if isinstance(s, bool):
        return "yes" if s else "no"
    t = normalize_answer(s)
    if t in _YES:
        return "yes"
    if t in _NO:
        return "no"
    return None


def yesno_match(pred: Any, answers: list[str]) -> float:
    p = to_yesno(pred)
    if p is None:
        return 0.0
    return float(any(to_yesno(a) == p for a in answers))


_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")


def mc_match(pred: Any, choices: list[str], correct: str | None) -> float:
    """A-OKVQA multiple choice: the prediction must be one of ``choices`` and the correct one.

    A bare option letter ("B", "(b)") selects that choice when it is not itself a choice.
    """
    if correct is None or pred is None:
        return 0.0
    norm_choices = [normalize_answer(c) for c in choices]
    p = normalize_answer(pred)
    if p not in norm_choices:
        m = _LETTER.match(str(pred).strip())
        idx = ord(m.group(1).lower()) - ord("a") if m else -1
        if not 0 <= idx < len(choices):
            return 0.0
        p = norm_choices[idx]
    return float(p == normalize_answer(correct))


def _mc_correct(question: Question) -> str | None:
    choices = question.meta.get("choices") or []
    idx = question.meta.get("correct_choice_idx")
    if isinstance(idx, int) and 0 <= idx < len(choices):
        return str(choices[idx])
    norm = {normalize_answer(c): c for c in choices}
    for a in question.answers:
        if normalize_answer(a) in norm:
            return str(norm[normalize_answer(a)])
    return None


_YESNO_QTYPES = frozenset({"exists", "exist", "yesno", "yes/no", "yes_no", "verify", "logical"})


def resolve_metric(question: Question, metric: str = "auto") -> str:
    """The metric a question is scored with.

    auto: multiple-choice ``meta.choices`` -> mc; dataset vqav2/vqa -> vqa; gqa -> exact;
    ``meta.qtype`` count -> count, exists/yes-no -> yesno; 3+ human answers (VQA-style
    annotation) -> vqa; gold answers all yes/no -> yesno; all numbers -> count; else exact.
    """
    if metric != "auto":
        if metric not in METRICS:
            raise VpdError(f"--metric must be auto or one of {', '.join(METRICS)}, got {metric!r}")
        return metric
    if question.meta.get("choices"):
        return "mc"
    ds = question.dataset.lower().replace("-", "").replace("_", "")
    if ds in ("vqav2", "vqa", "vqa2"):
        return "vqa"
    if ds == "gqa":
        return "exact"
    qtype = str(question.meta.get("qtype", "")).lower()
    if qtype in ("count", "counting", "number"):
        return "count"
    if qtype in _YESNO_QTYPES:
        return "yesno"
    if len(question.answers) >= 3:
        return "vqa"  # several annotators, who may disagree
    if question.answers and all(to_yesno(a) is not None for a in question.answers):
        return "yesno"
    if question.answers and all(to_number(a) is not None for a in question.answers):
        return "count"  # numeric gold: "3" == "three" == "3.0"
    return "exact"


def score_answer(pred: Any, question: Question, metric: str = "auto") -> float:
    """Score a predicted answer against a question's gold answers, in [0, 1]."""
    m = resolve_metric(question, metric)
    if pred is None:
        return 0.0
    if m == "vqa":
        return vqa_accuracy(pred, question.answers)
    if m == "exact":
        return exact_match(pred, question.answers)
    if m == "count":
        return count_match(pred, question.answers)
    if m == "yesno":
        return yesno_match(pred, question.answers)
    return mc_match(pred, list(question.meta.get("choices") or []), _mc_correct(question))


def threshold_for(metric: str, threshold: float | None) -> float:
    return DEFAULT_THRESHOLDS[metric] if threshold is None else threshold
