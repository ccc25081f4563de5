"""Answer normalization and the metrics of the field: one place, below every stage.

``vpd verify`` keeps programs with them, ``vpd eval`` scores VLM answers, ``vpd rationalize``
and the LLM judge compare answers with them.

Official metrics (``auto`` picks them by ``Question.dataset``). Each runs its benchmark's
official comparison on the prediction as the field post-processes it before that script
sees it (a raw "No." is not what any published GQA number scored). ``<name>_strict``
skips the post-processing: the official script on the raw prediction, case by case
(``tests/test_metrics_official.py``). Post-processing never turns a raw match into a
miss (bar an answer that normalizes to nothing, like "the"): it applies to both sides,
or to the prediction only where the gold is already in its output form.

- ``vqa`` (VQA v2, OK-VQA; vqaEval.py of GT-Vision-Lab/VQA): newline/tab to space and
  strip; answers and prediction normalized (punctuation removed or spaced, removed
  outright when the text has a "digit,digit" number like ``1,000``; at most 32 periods not
  followed by a digit removed, the script passing ``re.UNICODE`` as ``count``; lower-case;
  number words ``zero..ten`` and ``none`` to digits; articles a/an/the dropped; the
  contractions map). Score: mean over the n leave-one-out subsets of
  ``min(1, matches / 3)``. ``vqa`` normalizes both sides of every question, as lmms-eval's
  VQA v2 task does (``vqav2_process_results``); ``vqa_strict`` is vqaEval.py itself, which
  normalizes only when the human answers DISAGREE (when all agree, the raw prediction must
  equal them: "Yes" scores 0 against ten "yes"). LLaVA's submission script runs
  EvalAIAnswerProcessor on the prediction alone, whose tokenizer also splits "'s" off
  ("man's" -> "man 's", then a miss against vqaEval's "man's"): not copied.
- ``gqa`` (GQA eval.py: ``prediction == answer``): the prediction as LLaVA's
  ``scripts/convert_gqa_for_eval.py`` hands it to eval.py: the model output stripped
  (``model_vqa.py``), trailing periods removed (``rstrip(".")``), lower-cased. GQA's
  answers are lower-case words without a final period, so nothing else changes.
  ``gqa_strict``: raw strings. The official accuracy averages over ``isBalanced``
  questions only (:func:`in_official_accuracy`).
- ``aokvqa_da`` (A-OKVQA eval_predictions.py, direct answer): ``min(1, #(prediction ==
  direct answer) / 3)`` over the 10 answers, no leave-one-out; ``difficult_direct_answer``
  questions are outside the official average. A-OKVQA has no prediction script of its own
  and its score is VQA's, so ``aokvqa_da`` compares both sides under the VQA normalization
  as ``vqa`` does; ``aokvqa_da_strict``: raw strings.
- ``aokvqa_mc`` (same script, multiple choice): ``prediction == choices[correct_choice_idx]``;
  a bare option letter ("B", "(b)") that is not itself a choice reads as that choice,
  since the imported question lists lettered options. ``aokvqa_mc`` compares prediction
  and choices stripped, without trailing periods and lower-cased (the GQA rule, on both
  sides); ``aokvqa_mc_strict``: raw strings (the letter reading kept).
- ``count`` (TallyQA): the prediction read as a number (digits or number words) equals
  the integer answer (already a reading of free text: no strict variant).
- ``pope`` (POPE evaluate.py, = LLaVA's eval_pope.py): the prediction is cut at its first
  ".", commas removed, split on spaces; "No", "no" or "not" among the words means no,
  anything else yes; compared with the label ("no" is negative, anything else positive).
  That reading IS the official post-processing: no strict variant.
- ``nlvr2`` (NLVR2 eval/metrics.py): ``prediction.lower() == label.lower()`` on
  "True"/"False"; the statement is posed as a yes/no question, so "yes"/"no" stand for
  "True"/"False" on both sides. ``nlvr2`` first strips the prediction and its trailing
  periods (the GQA rule: "Yes." is yes); ``nlvr2_strict`` compares it as it is.

Lenient metrics for other data (synthetic scenes, generic imports): ``exact`` (normalized
exact match), ``yesno`` (yes/no/true/false/y/n), ``mc`` (normalized choice or letter), and
``vqa`` for any set with 3+ human answers. The official VQA formula assumes 10 answers
and degenerates with fewer than 4: the n - 1 others can never hold 3 matches, so even an
answer every annotator gave scores 2/3 (n = 3), 1/3 (n = 2) or 0 (n = 1). There, and
only there, ``vqa`` departs from it: full credit needs ``min(3, n - 1)`` matches among
the others, and one answer is exact match. VQA v2 and OK-VQA always have 10, where this
is the official formula.

Default keep thresholds: 1.0 for single-answer metrics; 0.3 for ``vqa`` and ``aokvqa_da``,
which is exactly "agrees with at least one of the 10 annotators" (VQA: 9 of 10 subsets
hold that annotator: 0.9 * 1/3 = 0.3; A-OKVQA: 1/3).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from vpd.errors import VpdError
from vpd.records import Question

Metric = Literal[
    "auto", "vqa", "exact", "count", "yesno", "mc", "gqa", "aokvqa_da", "aokvqa_mc", "pope",
    "nlvr2", "vqa_strict", "gqa_strict", "aokvqa_da_strict", "aokvqa_mc_strict", "nlvr2_strict",
]  # fmt: skip
# The suffix of the raw official comparison of a post-processed official metric.
STRICT = "_strict"
STRICT_OF: tuple[str, ...] = ("vqa", "gqa", "aokvqa_da", "aokvqa_mc", "nlvr2")
METRICS: tuple[str, ...] = (
    "vqa", "exact", "count", "yesno", "mc", "gqa", "aokvqa_da", "aokvqa_mc", "pope", "nlvr2",
    *(m + STRICT for m in STRICT_OF),
)  # fmt: skip

DEFAULT_THRESHOLDS: dict[str, float] = {
    "vqa": 0.3,  # = at least one of 10 annotators agrees (see module docstring)
    "exact": 1.0,
    "count": 1.0,
    "yesno": 1.0,
    "mc": 1.0,
    "gqa": 1.0,
    "aokvqa_da": 0.3,  # = one annotator's answer (1/3)
    "aokvqa_mc": 1.0,
    "pope": 1.0,
    "nlvr2": 1.0,
}
DEFAULT_THRESHOLDS.update({m + STRICT: DEFAULT_THRESHOLDS[m] for m in STRICT_OF})

# The answer shape of each official metric, for code that only cares about the shape
# (e.g. writing a canonical answer): yes/no, a number, free text, or a choice.
_FAMILY: dict[str, str] = {
    "gqa": "exact",
    "aokvqa_da": "vqa",
    "aokvqa_mc": "mc",
    "pope": "yesno",
    "nlvr2": "yesno",
}
_FAMILY.update({m + STRICT: _FAMILY.get(m, m) for m in STRICT_OF})


def base_metric(metric: str) -> tuple[str, bool]:
    """``"gqa_strict"`` -> ``("gqa", True)``; ``"gqa"`` -> ``("gqa", False)``."""
    if metric.endswith(STRICT) and metric[: -len(STRICT)] in STRICT_OF:
        return metric[: -len(STRICT)], True
    return metric, False


# Question.dataset (lower-case, without "-" and "_") -> its official metric.
OFFICIAL_METRIC: dict[str, str] = {
    "vqav2": "vqa",
    "vqa": "vqa",
    "vqa2": "vqa",
    "okvqa": "vqa",
    "gqa": "gqa",
    "tallyqa": "count",
    "pope": "pope",
    "nlvr2": "nlvr2",
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
    # The official call is periodStrip.sub("", out, re.UNICODE): re.UNICODE (32) lands in
    # the ``count`` slot, so at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=32)


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


def _vqa_clean(s: Any) -> str:
    return str(s).replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(pred: Any, answers: list[str], *, strict: bool = False) -> float:
    """VQA accuracy (vqaEval.py): see the module docstring.

    Answers and prediction are normalized (``strict``: only when the answers disagree, as
    vqaEval.py does); the score is the mean over leave-one-out subsets of
    ``min(1, matches / 3)``. With n < 4 answers, where the official formula cannot give
    full credit, a full credit needs ``min(3, n - 1)`` matches; with one answer it is exact
    match (our deviation, see the module docstring). No answers or an empty prediction -> 0.
    """
    n = len(answers)
    if n == 0 or pred is None:
        return 0.0
    res = _vqa_clean(pred)
    gts = [_vqa_clean(a) for a in answers]
    if not strict or len(set(gts)) > 1:
        gts = [normalize_answer(g) for g in gts]
        res = normalize_answer(res)
    if not res:
        return 0.0
    hits = [g == res for g in gts]
    if n == 1:
        return float(hits[0])
    need = min(3, n - 1)
    total = sum(hits)
    # Leaving out answer i removes one match iff answer i matched.
    acc = sum(min(1.0, (total - h) / need) for h in hits)
    return acc / n


def short_answer(pred: Any) -> str:
    """A short answer as LLaVA's convert_gqa_for_eval.py hands it to GQA's eval.py.

    ``text.rstrip(".").lower()`` of the output model_vqa.py already ``strip()``-ed: "No."
    -> "no", "Yes.." -> "yes"; other punctuation and articles stay. ``None`` -> ``""``.
    """
    return "" if pred is None else str(pred).strip().rstrip(".").lower()


def gqa_match(pred: Any, answers: list[str], *, strict: bool = False) -> float:
    """GQA eval.py: the prediction equals the answer; :func:`short_answer` first unless
    ``strict`` (then raw strings)."""
    if pred is None:
        return 0.0
    p = str(pred) if strict else short_answer(pred)
    return float(any(p == a for a in answers))


def aokvqa_da(pred: Any, direct_answers: list[str], *, strict: bool = False) -> float:
    """A-OKVQA direct answer: ``min(1, #(pred == answer) / 3)`` over the answers; both
    sides under the VQA normalization unless ``strict`` (then raw strings)."""
    if pred is None:
        return 0.0
    if strict:
        return min(1.0, sum(str(pred) == a for a in direct_answers) / 3.0)
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return min(1.0, sum(p == normalize_answer(a) for a in direct_answers) / 3.0)


def aokvqa_mc(pred: Any, choices: list[str], correct_idx: Any, *, strict: bool = False) -> float:
    """A-OKVQA multiple choice: ``pred == choices[correct_choice_idx]``; prediction and
    choices through :func:`short_answer` unless ``strict`` (then raw strings).

    A bare option letter that is not itself a choice reads as that choice.
    """
    if pred is None or not isinstance(correct_idx, int) or not 0 <= correct_idx < len(choices):
        return 0.0
    form = str if strict else short_answer
    forms = [form(c) for c in choices]
    p = form(pred)
    if p not in forms:
        m = _LETTER.match(str(pred).strip())
        idx = ord(m.group(1).lower()) - ord("a") if m else -1
        if 0 <= idx < len(choices):
            p = forms[idx]
    return float(p == forms[correct_idx])


def pope_answer(text: Any) -> str:
    """POPE evaluate.py's reading of a free-form answer: ``"yes"`` or ``"no"``."""
    t = "" if text is None else str(text)
    if t.find(".") != -1:
        t = t.split(".")[0]  # only the first sentence
    words = t.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_match(pred: Any, answers: list[str]) -> float:
    """POPE: the prediction read by :func:`pope_answer` against the label."""
    if pred is None or not answers:
        return 0.0
    label = "no" if answers[0] == "no" else "yes"  # the script: 'no' -> 0, anything else 1
    return float(pope_answer(pred) == label)


_NLVR2_WORDS = {"yes": "true", "no": "false"}


def nlvr2_match(pred: Any, answers: list[str], *, strict: bool = False) -> float:
    """NLVR2: ``prediction.lower() == label.lower()``, yes/no standing for True/False; the
    prediction through :func:`short_answer` first unless ``strict``."""
    if pred is None or not answers:
        return 0.0
    p = str(pred).lower() if strict else short_answer(pred)
    gold = answers[0].strip().lower()
    return float(_NLVR2_WORDS.get(p, p) == _NLVR2_WORDS.get(gold, gold))


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


def dataset_key(question: Question) -> str:
    """``Question.dataset`` as the metric tables spell it: lower-case, no "-" or "_"."""
    return question.dataset.lower().replace("-", "").replace("_", "")


def resolve_metric(question: Question, metric: str = "auto") -> str:
    """The metric a question is scored with.

    auto: the official metric of an official dataset (``OFFICIAL_METRIC``; A-OKVQA by
    ``meta.setting``: ``mc`` -> aokvqa_mc, else aokvqa_da); otherwise multiple-choice
    ``meta.choices`` -> mc; ``meta.qtype`` count -> count, exists/yes-no -> yesno; 3+ human
    answers (VQA-style annotation) -> vqa; gold answers all yes/no -> yesno; all numbers ->
    count; else exact.
    """
    if metric != "auto":
        if metric not in METRICS:
            raise VpdError(f"--metric must be auto or one of {', '.join(METRICS)}, got {metric!r}")
        return metric
    ds = dataset_key(question)
    if ds == "aokvqa":
        return "aokvqa_mc" if question.meta.get("setting") == "mc" else "aokvqa_da"
    if ds in OFFICIAL_METRIC:
        return OFFICIAL_METRIC[ds]
    if question.meta.get("choices"):
        return "mc"
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


def metric_family(metric: str) -> str:
    """The answer shape of a metric: vqa, exact, count, yesno or mc (official ones mapped)."""
    return _FAMILY.get(metric, metric)


def in_official_accuracy(question: Question, metric: str) -> bool:
    """Whether the official script counts this question in its average.

    GQA averages over ``isBalanced`` questions; A-OKVQA direct answer leaves out
    ``difficult_direct_answer`` questions. Everything else counts.
    """
    metric = base_metric(metric)[0]
    if metric == "gqa":
        return question.meta.get("isBalanced", True) is not False
    if metric == "aokvqa_da":
        return question.meta.get("difficult_direct_answer", False) is not True
    return True


def score_answer(pred: Any, question: Question, metric: str = "auto") -> float:
    """Score a predicted answer against a question's gold answers, in [0, 1]."""
    m, strict = base_metric(resolve_metric(question, metric))
    if pred is None:
        return 0.0
    if m == "vqa":
        return vqa_accuracy(pred, question.answers, strict=strict)
    if m == "exact":
        return exact_match(pred, question.answers)
    if m == "count":
        return count_match(pred, question.answers)
    if m == "yesno":
        return yesno_match(pred, question.answers)
    if m == "gqa":
        return gqa_match(pred, question.answers, strict=strict)
    if m == "aokvqa_da":
        return aokvqa_da(pred, question.answers, strict=strict)
    if m == "aokvqa_mc":
        choices = [str(c) for c in question.meta.get("choices") or []]
        return aokvqa_mc(pred, choices, question.meta.get("correct_choice_idx"), strict=strict)
    if m == "pope":
        return pope_match(pred, question.answers)
    if m == "nlvr2":
        return nlvr2_match(pred, question.answers, strict=strict)
    return mc_match(pred, list(question.meta.get("choices") or []), _mc_correct(question))


def threshold_for(metric: str, threshold: float | None) -> float:
    """The keep threshold: ``threshold`` if given, else the metric's default."""
    return DEFAULT_THRESHOLDS[metric] if threshold is None else threshold


def right_answer(
    pred: Any, question: Question, metric: str, threshold: float | None = None
) -> tuple[float, bool]:
    """The verifier's rule for a program's answer: its score, and whether it is right.

    ``metric`` is a resolved metric (``resolve_metric``). Right means a non-blank answer
    (raw text: "A" or "the" count) scoring at least ``threshold_for(metric, threshold)``.
    The verify stage and its transfer check both judge answers with this one rule.
    """
    if pred is None or not str(pred).strip():
        return 0.0, False
    score = score_answer(pred, question, metric)
    return score, score >= threshold_for(metric, threshold)


# ----------------------------------------------------------------------------- aggregates


def pope_summary(preds: list[Any], labels: list[str]) -> dict[str, float | int | None]:
    """POPE evaluate.py's totals: TP/FP/TN/FN, accuracy, precision, recall, F1, yes ratio.

    ``None`` where the script would divide by zero.
    """
    if len(preds) != len(labels):
        raise ValueError("pope_summary: as many predictions as labels")
    tp = fp = tn = fn = 0
    for p, label in zip(preds, labels, strict=True):
        yes, pos = pope_answer(p) == "yes", label != "no"
        tp += yes and pos
        fp += yes and not pos
        tn += not yes and not pos
        fn += not yes and pos
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall
        else None
    )
    return {
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": (tp + tn) / n if n else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else None,
    }


def nlvr2_consistency(correct: dict[str, bool]) -> float | None:
    """NLVR2's consistency: the share of sentences right on every image pair they describe.

    ``correct`` maps identifiers (``split-set-pair-sentence``) to whether the prediction
    was right; a sentence is its identifier with the pair id blanked, as in metrics.py.
    """
    by_sentence: dict[str, bool] = {}
    for ident, ok in correct.items():
        parts = ident.split("-")
        if len(parts) > 2:
            parts[2] = ""
        key = "-".join(parts)
        by_sentence[key] = by_sentence.get(key, True) and bool(ok)
    return sum(by_sentence.values()) / len(by_sentence) if by_sentence else None


def paired_bootstrap(
    a: list[float],
    b: list[float],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean difference ``a - b`` over paired items (the same questions) and its percentile
    bootstrap interval: resample the questions with replacement ``n_boot`` times, take the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled mean differences.
    Pairing keeps what both arms get right or wrong together out of the interval's width.
    Deterministic for a ``seed``."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    n = len(a)
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "n": 0, "level": level}
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)  # bounded memory for large question sets
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {
        "diff": round(float(d.mean()), 6),
        "lo": round(float(lo), 6),
        "hi": round(float(hi), 6),
        "n": n,
        "level": level,
        "excludes_zero": bool(lo > 0 or hi < 0),
    }
