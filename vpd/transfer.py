"""verify's transfer check: a kept program must also answer other questions of its template.

An answer-only verifier keeps programs that are right for the wrong reason. Asked "What
color is the object right of the orange square?", a writer that asks the orange square
itself is right whenever the two share the colour; expert iteration then trains on such
programs and they crowd out the ones that compare positions. The transfer check runs each
correct program on up to N other questions of its template (the same ``meta`` keys, e.g.
the synthetic set's ``template`` and ``phrasing``; without them, the same question text)
on other images, with the words in which the two questions differ replaced inside its
strings ("orange square" -> "blue circle"), and keeps it only if it answers those right
too. Their gold answers are training labels, so nothing outside the training split is used.

The partner programs are ordinary samples, run by the execute stage into
``<verified>.transfer/`` (its resume contract holds: a killed verify re-runs none of them).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import math
import re
import tokenize
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpd.execute import ExecuteConfig, run_execute
from vpd.metrics import normalize_answer, resolve_metric, right_answer
from vpd.records import Execution, Question, Sample, sample_id
from vpd.store import read_records, repair_torn_tail

_WORD = re.compile(r"[a-z0-9]+")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def question_words(text: str) -> list[str]:
    """The lower-cased words of a question, punctuation dropped."""
    return _WORD.findall(text.lower())


def word_map(src: str, dst: str) -> dict[str, str] | None:
    """The replacements that turn question ``src`` into ``dst``: the runs of words in which
    they differ, aligned around the words they share ("the small purple object" -> "the red
    object": "small purple" -> "red"). A word added or dropped takes the word after it along
    ("red object" -> "large red object": "red" -> "large red"). None when they are not a
    plain substitution: nothing shared, a run mapped two ways, or a replaced run that also
    stands unchanged elsewhere in ``src`` (replacing it would change that too). Plurals
    bring their singular ("circles" -> "stars" also maps "circle" -> "star"), as programs
    name objects in the singular."""
    a, b = question_words(src), question_words(dst)
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    if not any(op == "equal" for op, *_ in ops):
        return None
    pairs: list[tuple[list[str], list[str]]] = []
    for op, i1, i2, j1, j2 in ops:
        if op == "equal":
            continue
        if i1 == i2 or j1 == j2:  # an insertion or deletion: take the next word along
            if i2 < len(a) and j2 < len(b):
                i2, j2 = i2 + 1, j2 + 1
            elif i1 > 0 and j1 > 0:
                i1, j1 = i1 - 1, j1 - 1
            else:
                return None
        pairs.append((a[i1:i2], b[j1:j2]))
    # Equal-length runs map word by word ("large orange circles" -> "small red stars":
    # programs split them, find('orange circle') and a size check), unless a word of the run
    # also stands elsewhere in ``src``: then the run maps as one phrase.
    replaced = Counter(w for x, _ in pairs for w in x)
    everywhere = Counter(a)
    units: list[tuple[str, str]] = []
    for x, y in pairs:
        if len(x) == len(y) and all(everywhere[w] == replaced[w] for w in x):
            units += [(w, v) for w, v in zip(x, y, strict=True) if w != v]
        else:
            units.append((" ".join(x), " ".join(y)))
    mapping: dict[str, str] = {}
    for key, val in units:
        if mapping.get(key, val) != val:
            return None
        mapping[key] = val
    text = " " + " ".join(a) + " "
    uses = Counter(key for key, _ in units)
    for key in list(mapping):
        # A run that also stands elsewhere unchanged would be replaced there too.
        if text.count(f" {key} ") > uses[key]:
            return None
    for key, val in list(mapping.items()):
        if len(key) > 3 and len(val) > 3 and key.endswith("s") and val.endswith("s"):
            mapping.setdefault(key[:-1], val[:-1])
    return mapping


def _string_spans(program: str, syntax: str) -> list[tuple[int, int]]:
    """Character spans of the program's string literals (Python tokens for viper programs,
    quoted runs for VisProg lines)."""
    if syntax != "viper":
        return [m.span() for m in _QUOTED.finditer(program)]
    starts = [0]
    for line in program.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(program).readline):
            if tok.type == tokenize.STRING:
                (r0, c0), (r1, c1) = tok.start, tok.end
                spans.append((starts[r0 - 1] + c0, starts[r1 - 1] + c1))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return [m.span() for m in _QUOTED.finditer(program)]
    return spans


def rewrite_program(program: str, mapping: dict[str, str], syntax: str = "viper") -> str:
    """``program`` with every whole word of ``mapping`` replaced inside its string literals
    (all at once, so swaps work; a capitalised word stays capitalised). Code is untouched:
    ``.left`` stays ``.left`` when the question's "left" becomes "right"."""
    if not mapping:
        return program
    runs = sorted(mapping, key=len, reverse=True)  # the longest run first
    alternatives = (r"\s+".join(re.escape(w) for w in run.split()) for run in runs)
    pattern = re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.IGNORECASE)

    def swap(m: re.Match[str]) -> str:
        new = mapping[" ".join(m.group(0).lower().split())]
        return new[:1].upper() + new[1:] if m.group(0)[:1].isupper() else new

    out, last = [], 0
    for s, e in _string_spans(program, syntax):
        out += [program[last:s], pattern.sub(swap, program[s:e])]
        last = e
    out.append(program[last:])
    return "".join(out)


def template_key(q: Question, keys: Sequence[str]) -> tuple[Any, ...]:
    """A question's template: its ``meta`` values under ``keys`` when it has them all,
    else its question text (only exact repeats are partners then)."""
    if keys and all(k in q.meta for k in keys):
        return ("meta", *(str(q.meta[k]) for k in keys))
    return ("text", " ".join(question_words(q.question)))


@dataclass
class Partner:
    """One other question a program is tried on, and the program rewritten for it."""

    question: Question
    program: str
    sample_id: str = ""
    phrase: bool = False  # its words map onto the program's question only as phrases
    right: bool = False  # it answered the partner question right (set by the check)
    answer: str | None = None  # what it answered there


@dataclass(frozen=True)
class PartnerOption:
    """A question a program could be checked on, and what ranks it.

    ``phrase``: its words map onto the program's question only as phrases of other lengths
    ("red object large" -> "square small"), which a program naming its parts apart
    (find('red object'), then a size check) misses: such partners come last.
    ``answer``: its gold answer (the first, normalized), and ``same_answer``: whether the
    program's question has it too. Partners are spread over the answers (a contrast set):
    a program that says "yes" whenever the reference object exists passes three "yes"
    partners, and one that finds only 'square' for "a small square" passes three whose
    answer is "yes"; each fails a partner with the other answer."""

    phrase: bool
    answer: str
    same_answer: bool
    question: Question
    mapping: dict[str, str]


@dataclass
class Verdict:
    """What the check found for one program (``checked == 0``: no partner was found)."""

    checked: int = 0
    right: int = 0
    passed: bool = True
    failure: str = ""
    partners: list[Partner] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The ``transfer`` field of the program's Verified record (``on``: the partner
        questions' ids)."""
        return {
            "checked": self.checked,
            "right": self.right,
            "passed": self.passed,
            "on": [p.question.id for p in self.partners],
        }


class TransferCheck:
    """Runs correct programs on other questions of their template.

    ``pool``: every question partners may come from (the training questions, all shards);
    ``partners``: how many per program; ``min_right``: the fraction of them it must get
    right; ``execute``: the execute stage's options for the partner runs; ``work``: the
    folder of their samples and executions; ``force``: run them again under other execute
    options."""

    def __init__(
        self,
        pool: Iterable[Question],
        *,
        partners: int,
        min_right: float,
        keys: Sequence[str],
        metric: str,
        threshold: float | None,
        execute: dict[str, Any],
        questions: Path,
        work: Path,
        force: bool = False,
    ) -> None:
        self.partners, self.min_right, self.keys = partners, min_right, list(keys)
        self.metric, self.threshold = metric, threshold
        self.execute, self.questions, self.work = dict(execute), Path(questions), Path(work)
        self.force = force
        self.groups: dict[tuple[Any, ...], list[Question]] = {}
        for q in pool:
            self.groups.setdefault(template_key(q, self.keys), []).append(q)
        self.samples = self.work / "samples.jsonl"
        self.executions = self.work / "executions.jsonl"
        # (partner qid, program) -> sample id: a program rewritten the same way for the
        # same partner runs once, across questions, chunks and resumed runs.
        self.ids: dict[tuple[str, str], str] = {}
        self.next_k: dict[str, int] = {}
        if self.samples.exists():
            repair_torn_tail(self.samples)  # a kill -9 mid-append
            for s in read_records(self.samples, Sample, allow_empty=True):
                self.ids[(s.qid, s.program)] = s.id
                self.next_k[s.qid] = max(self.next_k.get(s.qid, 0), s.k + 1)

    def candidates(self, q: Question) -> list[PartnerOption]:
        """The questions of ``q``'s template on other images whose words map onto ``q``'s,
        with what ranks them (see ``PartnerOption``). The same for every program of ``q``."""
        gold = {normalize_answer(a) for a in q.answers}
        found = []
        for p in self.groups.get(template_key(q, self.keys), []):
            if p.id == q.id or p.image == q.image:
                continue
            mapping = word_map(q.question, p.question)
            if mapping is not None:
                phrase = any(" " in k or " " in v for k, v in mapping.items())
                answer = normalize_answer(p.answers[0]) if p.answers else ""
                found.append(PartnerOption(phrase, answer, answer in gold, p, mapping))
        return found

    def partners_of(self, sample: Sample, candidates: list[PartnerOption]) -> list[Partner]:
        """Up to ``partners`` of its question's ``candidates``: one-for-one word maps
        first; among those, one partner per answer in turn (answers other than the
        question's first), each answer's partners in an order fixed by the program's
        sample id (so a re-run picks the same ones)."""

        digest = {
            c.question.id: hashlib.sha1(f"{sample.id}|{c.question.id}".encode()).hexdigest()
            for c in candidates
        }
        turn: dict[tuple[bool, str], int] = {}
        ranked = []
        for c in sorted(candidates, key=lambda c: (c.phrase, digest[c.question.id])):
            n = turn[c.phrase, c.answer] = turn.get((c.phrase, c.answer), -1) + 1
            ranked.append(((c.phrase, n, c.same_answer, digest[c.question.id]), c))
        ranked.sort(key=lambda r: r[0])
        return [
            Partner(
                c.question,
                rewrite_program(sample.program, c.mapping, sample.syntax),
                phrase=c.phrase,
            )
            for _, c in ranked[: self.partners]
        ]

    def check(
        self, items: Sequence[tuple[Question, Sample]], skip: Collection[str] = ()
    ) -> list[Verdict]:
        """One verdict per (question, program), running the partner programs not run yet;
        questions whose id is in ``skip`` are never partners."""
        # A question's programs share its candidates (word maps): aligned once per question.
        per_question: dict[str, list[PartnerOption]] = {}
        verdicts = []
        for q, s in items:
            if q.id not in per_question:
                per_question[q.id] = [c for c in self.candidates(q) if c.question.id not in skip]
            verdicts.append(Verdict(partners=self.partners_of(s, per_question[q.id])))
        new: list[Sample] = []
        for (_, s), v in zip(items, verdicts, strict=True):
            for p in v.partners:
                key = (p.question.id, p.program)
                if key not in self.ids:
                    k = self.next_k.get(p.question.id, 0)
                    self.next_k[p.question.id] = k + 1
                    self.ids[key] = sample_id(p.question.id, k)
                    new.append(
                        Sample(
                            id=self.ids[key],
                            qid=p.question.id,
                            k=k,
                            program=p.program,
                            syntax=s.syntax,
                            model=s.model,
                            prompt_id="transfer",
                            source=s.id,
                        )
                    )
                p.sample_id = self.ids[key]
        if new:
            self.work.mkdir(parents=True, exist_ok=True)
            with open(self.samples, "a", encoding="utf-8") as f:
                for s in new:
                    f.write(s.model_dump_json() + "\n")
        if not any(v.partners for v in verdicts):
            return verdicts
        run_execute(
            ExecuteConfig(
                **{
                    **self.execute,
                    "samples": self.samples,
                    "questions": self.questions,
                    "out": self.executions,
                    "force": self.force,
                    # verify's own bar counts the questions (rich shows one live bar).
                    "progress": False,
                }
            )
        )
        wanted = {p.sample_id for v in verdicts for p in v.partners}
        runs = {
            e.id: e
            for e in read_records(self.executions, Execution, allow_empty=True)
            if e.id in wanted
        }
        for v in verdicts:
            self._judge(v, runs)
        return verdicts

    def _judge(self, v: Verdict, runs: dict[str, Execution]) -> None:
        wrong: list[str] = []
        for p in v.partners:
            e = runs.get(p.sample_id)
            q = p.question
            metric = resolve_metric(q, self.metric)
            ok = e is not None and e.status == "ok"
            ok = ok and right_answer(e.answer, q, metric, self.threshold)[1]
            p.right, p.answer = ok, e.answer if e is not None else None
            v.checked += 1
            v.right += ok
            if not ok:
                if e is None:
                    got = "not run"
                elif e.status != "ok":
                    got = e.status
                else:
                    got = f"answered {e.answer!r}"
                gold = q.answers[0] if q.answers else ""
                wrong.append(f"{q.id}: {got}, expected {gold!r}")
        v.passed = v.checked == 0 or v.right >= math.ceil(self.min_right * v.checked - 1e-9)
        if not v.passed:
            v.failure = (
                f"right here, wrong on {v.checked - v.right} of {v.checked} other questions "
                f"of its template ({wrong[0]})"
            )


@dataclass
class Spread:
    """A kept program rewritten for another question of its template that it answered
    right there: a verified program of that question."""

    question: Question
    program: str
    sample_id: str  # the run's id in the check's samples/executions files
    answer: str | None
    source: str  # the kept program's sample id


def spread_programs(
    kept: Sequence[tuple[Question, Sample]], check: TransferCheck, target: int
) -> list[Spread]:
    """Fill each template up to ``target`` questions that have a verified program.

    Expert iteration learns a template in proportion to the sampled questions the writer
    happened to solve: a hard template with one solved question of twenty is nearly absent
    from its data. Here each kept program of a template with fewer than ``target`` solved
    questions is rewritten for its other questions (as the transfer check does: the words
    in which the questions differ replaced in its strings), run, and every question it
    answers right (against its own label) gets that program, until the template has
    ``target``. A program spreads only if it answers every question it was tried on whose
    words map one for one right (partners with other answers first): a shortcut that
    survived the verifier's few partners is not copied over the template. A question whose
    words map only as phrases ("red circle" -> "large green star") is taught where the
    rewrite answers it right, but its failure does not stop the program (a phrase map can
    split a right program's strings wrongly). Only questions of ``check``'s pool are used
    (the training split), and none already solved (``kept``'s). ``check.partners`` bounds
    the tries per program."""
    keys = check.keys
    covered: dict[tuple[Any, ...], set[str]] = {}
    for q, _ in kept:
        covered.setdefault(template_key(q, keys), set()).add(q.id)
    todo = [(q, s) for q, s in kept if len(covered[template_key(q, keys)]) < target]
    solved = {qid for ids in covered.values() for qid in ids}
    out: list[Spread] = []
    for (q, s), v in zip(todo, check.check(todo, skip=solved), strict=True):
        have = covered[template_key(q, keys)]
        if not all(p.right for p in v.partners if not p.phrase):
            continue
        for p in v.partners:
            if len(have) >= target:
                break
            if p.right and p.question.id not in have:
                have.add(p.question.id)
                out.append(Spread(p.question, p.program, p.sample_id, p.answer, s.id))
    return out
