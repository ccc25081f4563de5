"""`vpd verify`: score each executed program's answer and keep the correct ones.

Two jobs live here, both about "is this answer right":

1. Metrics the field uses, with the official VQA v2 answer normalization
   (``normalize_answer``, ``vqa_accuracy``, ``score_answer``), exact match (GQA),
   count match, yes/no and multiple choice (A-OKVQA).
2. The selection stage (``VerifyConfig`` / ``run_verify``): join executions with
   their samples (program) and questions (gold answers), score every sample, apply
   a per-question selection policy, and write one ``Verified`` record for EVERY
   sample (kept or not, with a reason), plus a funnel summary.

Conventions and choices (documented for users of the metrics):

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

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpd.errors import VpdError
from vpd.records import Execution, Question, Sample, Verified

Metric = Literal["auto", "vqa", "exact", "count", "yesno", "mc"]
Policy = Literal["first", "shortest", "all", "majority"]
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


# ----------------------------------------------------------------------------- input indexing


class _LabelledRejects:
    """Prefix reject reasons with the input they came from (three inputs, one rejects file)."""

    def __init__(self, rejects: Any, label: str) -> None:
        self.rejects, self.label = rejects, label

    def write(self, line: int, reason: str, raw: str, rid: str | None = None) -> None:
        self.rejects.write(line, f"{self.label}: {reason}", raw, rid)


def scan_jsonl(
    path: Path, model: type[Any], rejects: Any, label: str
) -> Iterator[tuple[Any, int, int]]:
    """Stream ``(record, byte offset, line number)`` of a JSONL file; bad lines are rejected.

    Offsets let a stage index a big input in a few bytes per record and load each
    record again (``load_at``) only when its question is processed. A last line with
    no newline that does not parse is a file still being written: skipped, not rejected.
    """
    path = Path(path)
    if not path.exists():
        raise VpdError(f"{label} file not found: {path}")
    if path.is_dir():
        raise VpdError(f"expected a JSONL file for {label}, got a directory: {path}")
    seen: set[str] = set()
    offset = 0
    with open(path, "rb") as f:
        for lineno, bline in enumerate(f, 1):
            start, offset = offset, offset + len(bline)
            raw = bline.decode("utf-8", errors="replace").rstrip("\n")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                if not bline.endswith(b"\n"):
                    break
                rejects.write(lineno, f"{label}: malformed JSON: {e.msg}", raw)
                continue
            if not isinstance(obj, dict):
                rejects.write(lineno, f"{label}: expected a JSON object", raw)
                continue
            rid = obj.get("id") if isinstance(obj.get("id"), str) else None
            try:
                rec = model.model_validate(obj)
            except ValidationError as e:
                why = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc']) or 'record'}: {err['msg']}"
                    for err in e.errors()
                )
                rejects.write(lineno, f"{label}: invalid record: {why}", raw, rid)
                continue
            if rec.id in seen:
                rejects.write(lineno, f"{label}: duplicate id {rec.id!r}", raw, rec.id)
                continue
            seen.add(rec.id)
            yield rec, start, lineno


def load_at(f: Any, offset: int, model: type[Any]) -> Any:
    """Re-read the record that ``scan_jsonl`` found at ``offset`` of the open binary file."""
    f.seek(offset)
    return model.model_validate_json(f.readline())


# ----------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    """One sample of a question on its way to a ``Verified`` record."""

    sample: Sample
    execution: Execution | None
    metric: str
    threshold: float
    score: float = 0.0
    correct: bool = False
    judged: bool = False
    reason: str = ""
    kept: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        return self.execution.answer if self.execution is not None else None

    @property
    def ran_ok(self) -> bool:
        return self.execution is not None and self.execution.status == "ok"

    @property
    def judgeable(self) -> bool:
        """An open answer the metric rejected: the optional LLM judge gets a second look."""
        return (
            self.ran_ok
            and not self.correct
            and self.metric in ("vqa", "exact")
            and bool(normalize_answer(self.answer))
        )


def _first_line(text: str | None, limit: int = 200) -> str:
    lines = (text or "").strip().splitlines()
    # Tracebacks end with the message that matters.
    line = lines[-1].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def score_candidates(question: Question, cands: list[Candidate]) -> None:
    """Fill score/correct/reason of each candidate from its execution (no policy yet)."""
    for c in cands:
        if not c.sample.valid:
            c.reason = f"invalid sample: {c.sample.reason or 'no program in the LLM output'}"
        elif c.execution is None:
            c.reason = "not executed"
        elif c.execution.status != "ok":
            why = _first_line(c.execution.error) or "no error message"
            c.reason = f"execution {c.execution.status}: {why}"
        elif not normalize_answer(c.answer):
            c.reason = "no answer returned"
        else:
            c.score = score_answer(c.answer, question, c.metric)
            c.correct = c.score >= c.threshold
            c.reason = "" if c.correct else f"wrong answer: {c.answer!r} (score {c.score:.2f})"


def _program_size(c: Candidate) -> tuple[int, int]:
    # Shortest = fewest non-blank characters; ties go to the earlier sample.
    return (len("".join(c.sample.program.split())), c.sample.k)


def apply_policy(cands: list[Candidate], policy: str) -> None:
    """Decide ``kept`` for a question's scored candidates (``first|shortest|all|majority``).

    majority: the most common answer among all programs that ran ok (normalized; ties
    count every tied answer) is the consensus; correct programs agreeing with it are kept.
    """
    correct = sorted((c for c in cands if c.correct), key=lambda c: c.sample.k)
    if policy == "all":
        keep = correct
    elif policy == "first":
        keep = correct[:1]
    elif policy == "shortest":
        keep = sorted(correct, key=_program_size)[:1]
    elif policy == "majority":
        votes = Counter(
            normalize_answer(c.answer) for c in cands if c.ran_ok and normalize_answer(c.answer)
        )
        top = max(votes.values(), default=0)
        majority = {a for a, n in votes.items() if n == top}
        keep = [c for c in correct if normalize_answer(c.answer) in majority]
    else:
        raise VpdError(f"--policy must be first, shortest, all or majority, got {policy!r}")
    kept_ids = {id(c) for c in keep}
    for c in cands:
        if id(c) in kept_ids:
            c.kept = True
            c.reason = "kept"
        elif c.correct:
            c.reason = f"dropped by policy {policy}"
            if policy == "majority":
                c.reason += f" (answer {c.answer!r} is not the majority answer)"


def to_verified(c: Candidate) -> Verified:
    ex = c.execution
    return Verified(
        id=c.sample.id,
        qid=c.sample.qid,
        answer=c.answer,
        score=round(c.score, 4),
        kept=c.kept,
        reason=c.reason,
        program=c.sample.program,
        trace=list(ex.trace) if ex is not None else [],
        k=c.sample.k,
        status=ex.status if ex is not None else None,
        valid=c.sample.valid,
        metric=c.metric,
        correct=c.correct,
        judged=c.judged,
    )


# ----------------------------------------------------------------------------- stage


class VerifyConfig(BaseModel):
    """Every option of `vpd verify` (also the `verify:` section of a recipe)."""

    model_config = ConfigDict(extra="forbid")

    executions: Path
    samples: Path
    questions: Path
    out: Path
    policy: Policy = "all"
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None: per-metric default"
    )
    metric: Metric = "auto"
    allow_missing: bool = False
    judge: bool = False
    llm: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=64, ge=1)
    shard: str | None = None
    force: bool = False
    progress: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """The options that change results (what ``<out>.meta.json`` records)."""
        fp: dict[str, Any] = {
            "stage": "verify",
            "policy": self.policy,
            "threshold": self.threshold,
            "metric": self.metric,
            "allow_missing": self.allow_missing,
            "judge": self.judge,
        }
        if self.judge:
            from vpd.judge import judge_fingerprint

            fp["judge_config"] = judge_fingerprint(self.llm)
        return fp


def funnel_path(out: Path) -> Path:
    return Path(str(out) + ".funnel.json")


def compute_funnel(out: Path, questions: int | None = None) -> dict[str, Any]:
    """Funnel counts over everything in the verified output (all runs, not only this one)."""
    samples = valid = ran_ok = correct = kept = judged = 0
    qids: set[str] = set()
    kept_q: set[str] = set()
    status: Counter[str] = Counter()
    metrics: Counter[str] = Counter()
    path = Path(out)
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                samples += 1
                qids.add(r.get("qid"))
                valid += bool(r.get("valid", True))
                st = r.get("status") or ("invalid" if not r.get("valid", True) else "not executed")
                status[st] += 1
                ran_ok += st == "ok"
                correct += bool(r.get("correct"))
                judged += bool(r.get("judged"))
                metrics[r.get("metric") or "?"] += 1
                if r.get("kept"):
                    kept += 1
                    kept_q.add(r.get("qid"))
    return {
        "questions": questions if questions is not None else len(qids),
        "questions_verified": len(qids),
        "samples": samples,
        "valid_programs": valid,
        "ran_ok": ran_ok,
        "correct": correct,
        "kept": kept,
        "questions_with_kept": len(kept_q),
        "judged_correct": judged,
        "status": dict(sorted(status.items())),
        "metric": dict(sorted(metrics.items())),
    }


def _print_funnel(fun: dict[str, Any]) -> None:
    from rich.table import Table

    from vpd.progress import console

    table = Table(title="verify funnel")
    table.add_column("step")
    table.add_column("count", justify="right")
    table.add_column("of samples", justify="right")
    n = max(1, fun["samples"])
    for label, key in (
        ("questions", "questions"),
        ("samples", "samples"),
        ("valid programs", "valid_programs"),
        ("ran ok", "ran_ok"),
        ("correct", "correct"),
        ("kept", "kept"),
        ("questions with >= 1 kept", "questions_with_kept"),
    ):
        pct = "" if key.startswith("question") else f"{100 * fun[key] / n:.1f}%"
        table.add_row(label, str(fun[key]), pct)
    console().print(table)


def run_verify(cfg: VerifyConfig, judge: Any = None) -> dict[str, Any]:
    """Verify every sample (resumable; the unit is a question); returns a summary.

    ``judge`` (tests, or callers holding an LLM already): an object with
    ``judge(items) -> list[bool]`` used instead of building one from ``cfg.llm``.
    """
    from vpd.progress import progress_bar
    from vpd.store import StageOutput, parse_shard, read_records

    t0 = time.time()
    shard = parse_shard(cfg.shard)
    if cfg.out.resolve() in {p.resolve() for p in (cfg.executions, cfg.samples, cfg.questions)}:
        raise VpdError(f"--out {cfg.out} is also an input")
    threshold = {m: threshold_for(m, cfg.threshold) for m in METRICS}
    written = skipped = pending = 0
    with StageOutput(cfg.out, cfg.fingerprint(), shard=shard, force=cfg.force) as so:
        # Index inputs: questions in memory (small); samples/executions by byte offset.
        questions: dict[str, Question] = {}
        for q in read_records(cfg.questions, Question, _LabelledRejects(so.rejects, "questions")):
            if so.owns(q.id):
                questions[q.id] = q
        by_q: dict[str, list[tuple[int, str, int]]] = {}
        for s, off, line in scan_jsonl(cfg.samples, Sample, so.rejects, "samples"):
            if not so.owns(s.qid):
                continue
            if s.qid not in questions:
                so.rejects.write(line, f"samples: unknown question id {s.qid!r}", s.id, s.id)
                continue
            by_q.setdefault(s.qid, []).append((s.k, s.id, off))
        exec_off: dict[str, int] = {}
        for e, off, _ in scan_jsonl(cfg.executions, Execution, so.rejects, "executions"):
            if so.owns(e.qid):
                exec_off[e.id] = off
        todo = [
            qid
            for qid in questions
            if qid in by_q and not all(so.done(sid) for _, sid, _ in by_q[qid])
        ]
        todo_set = set(todo)
        skipped = sum(1 for qid in by_q if qid not in todo_set)
        owned_judge = None  # a judge (and LLM) this run built, closed at the end
        if cfg.judge and judge is None and todo:
            from vpd.judge import make_judge

            judge = owned_judge = make_judge(cfg.llm, Path(str(cfg.out) + ".judge.jsonl"))
        judge_calls = 0
        with (
            open(cfg.samples, "rb") as fs,
            open(cfg.executions, "rb") as fe,
            progress_bar("verify", len(todo), unit="q", enabled=cfg.progress) as bar,
        ):
            for start in range(0, len(todo), cfg.batch_size):
                batch: list[tuple[Question, list[Candidate]]] = []
                for qid in todo[start : start + cfg.batch_size]:
                    q = questions[qid]
                    metric = resolve_metric(q, cfg.metric)
                    cands = []
                    for _, sid, off in sorted(by_q[qid]):
                        sample = load_at(fs, off, Sample)
                        ex = load_at(fe, exec_off[sid], Execution) if sid in exec_off else None
                        cands.append(Candidate(sample, ex, metric, threshold[metric]))
                    missing = [c for c in cands if c.sample.valid and c.execution is None]
                    if missing and not cfg.allow_missing:
                        pending += 1  # execution still running: verify this question later
                        bar.advance()
                        continue
                    score_candidates(q, cands)
                    batch.append((q, cands))
                if judge is not None:
                    asks = [(q, c) for q, cands in batch for c in cands if c.judgeable]
                    if asks:
                        verdicts = judge.judge([(q.question, q.answers, c.answer) for q, c in asks])
                        judge_calls += len(asks)
                        for (_, c), ok in zip(asks, verdicts, strict=True):
                            if ok:
                                c.score, c.correct, c.judged, c.reason = 1.0, True, True, ""
                for _, cands in batch:
                    apply_policy(cands, cfg.policy)
                    for c in cands:
                        if not so.done(c.sample.id):
                            so.write(to_verified(c))
                            written += 1
                    bar.advance()
                so.sync()
        rejects = so.rejects.count
    if owned_judge is not None:
        owned_judge.llm.close()
    if pending:
        from vpd.progress import console

        console().print(
            f"[yellow]{pending} question(s) have samples with no execution yet[/yellow]: "
            "finish `vpd execute` and run verify again (or --allow-missing)"
        )
    fun = compute_funnel(cfg.out, questions=len(questions))
    funnel_path(cfg.out).write_text(json.dumps(fun, indent=2), encoding="utf-8")
    if cfg.progress:
        _print_funnel(fun)
    wall = time.time() - t0
    return {
        "out": str(cfg.out),
        "written": written,
        "questions_done_before": skipped,
        "questions_pending": pending,
        "rejects": rejects,
        "judge_calls": judge_calls if cfg.judge or judge is not None else 0,
        "wall_s": round(wall, 3),
        "samples_per_s": round(written / wall, 1) if wall > 0 else None,
        "funnel": fun,
    }
