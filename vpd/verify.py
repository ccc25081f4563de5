"""`vpd verify`: score each executed program's answer and keep the correct ones.

The selection stage (``VerifyConfig`` / ``run_verify``): join executions with their
samples (program) and questions (gold answers), score every sample with the metrics of
``vpd.metrics``, optionally run each correct program on other questions of its template
(``transfer``, ``vpd.transfer``), apply a per-question selection policy, and write one
``Verified`` record for EVERY sample (kept or not, with a reason), plus a funnel summary.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.execute import ExecuteConfig
from vpd.judge import judge_fingerprint, make_judge
from vpd.metrics import (
    METRICS,
    Metric,
    normalize_answer,
    resolve_metric,
    right_answer,
    threshold_for,
)
from vpd.options import force_field, progress_field, shard_field
from vpd.progress import console, progress_bar
from vpd.records import Execution, Question, Sample, Verified
from vpd.store import (
    LabelledRejects,
    StageOutput,
    atomic_write_json,
    load_at,
    parse_shard,
    read_records,
    scan_jsonl,
)
from vpd.transfer import TransferCheck, Verdict

Policy = Literal["first", "shortest", "all", "majority"]


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
    transfer: Verdict | None = None  # None: not checked on other questions
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        """Correct, and not wrong on the other questions of its template."""
        return self.correct and (self.transfer is None or self.transfer.passed)

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
        elif not (c.answer or "").strip():
            c.reason = "no answer returned"
        else:
            c.score, c.correct = right_answer(c.answer, question, c.metric, c.threshold)
            c.reason = "" if c.correct else f"wrong answer: {c.answer!r} (score {c.score:.2f})"


def _program_size(c: Candidate) -> tuple[int, int]:
    # Shortest = fewest non-blank characters; ties go to the earlier sample.
    return (len("".join(c.sample.program.split())), c.sample.k)


def apply_policy(cands: list[Candidate], policy: str) -> None:
    """Decide ``kept`` for a question's scored candidates (``first|shortest|all|majority``).

    majority: the most common answer among all programs that ran ok (normalized; ties
    count every tied answer) is the consensus; correct programs agreeing with it are kept.
    """
    correct = sorted((c for c in cands if c.eligible), key=lambda c: c.sample.k)
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
        elif c.correct and c.transfer is not None and not c.transfer.passed:
            c.reason = c.transfer.failure
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
        score=c.score,  # unrounded: 2/3 stays 2/3 (reports round for display)
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
        **({"transfer": c.transfer.record()} if c.transfer is not None else {}),
    )


# ----------------------------------------------------------------------------- stage


class VerifyConfig(BaseModel):
    """Score every executed program against the gold answers and keep the correct ones.

    Writes one record per sample (kept or not, with the reason) and OUT.funnel.json.

    Every option of `vpd verify` (also the `verify:` section of a recipe).
    """

    model_config = ConfigDict(extra="forbid")

    executions: Path = Field(description="Executions JSONL from `vpd execute`.")
    samples: Path = Field(description="Samples JSONL (the programs).")
    questions: Path = Field(description="Questions JSONL (gold answers).")
    out: Path = Field(description="Verified JSONL (one record per sample).")
    policy: Policy = Field(
        "all",
        description=("Which correct programs to keep per question: first|shortest|all|majority."),
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Keep if score >= this (default 1.0; 0.3 for the VQA metrics).",
    )
    metric: Metric = Field(
        "auto",
        description="auto (each dataset's official metric, else by answer shape) or one of "
        "vqa|gqa|aokvqa_da|aokvqa_mc|count|pope|nlvr2 (official, on the prediction as the "
        "field post-processes it; NAME_strict: on the raw prediction) and exact|yesno|mc "
        "(lenient).",
    )
    allow_missing: bool = Field(
        False, description="Verify questions whose programs are not all executed yet."
    )
    judge: bool = Field(False, description="Ask an LLM about open answers the metric rejects.")
    llm: dict[str, Any] = Field(
        default_factory=dict,
        description="The judge LLM (its flags: --backend, --model, --base-url, --api-key).",
        json_schema_extra={"cli": False},
    )
    batch_size: int = Field(default=64, ge=1, description="Judge requests per batch.")
    transfer: int = Field(
        0,
        ge=0,
        description="Run each correct program on up to N other questions of its template "
        "(other images, the question's differing words replaced in its strings; one per "
        "answer in turn, other answers first) and keep it only if it answers them right "
        "too: drops programs right for the wrong reason. 0: off.",
    )
    transfer_min: float = Field(
        1.0, gt=0.0, le=1.0, description="The fraction of those it must answer right."
    )
    transfer_keys: list[str] = Field(
        default_factory=lambda: ["template", "phrasing"],
        description="The question meta keys that name a template (questions without them: "
        "only the same question text is a partner).",
    )
    execute: dict[str, Any] = Field(
        default_factory=dict,
        description="Execute options for the transfer runs (e.g. backend=hf).",
        json_schema_extra={"cli": "key=value"},
    )
    shard: str | None = shard_field()
    force: bool = force_field()
    progress: bool = progress_field()

    @field_validator("execute")
    @classmethod
    def _execute_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        # A bad option for the partner runs fails here, not after the scoring has begun.
        try:
            ExecuteConfig(**{**v, "samples": Path(), "questions": Path(), "out": Path()})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"execute option {where}: {err['msg']}") from None
        return v

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
            fp["judge_config"] = judge_fingerprint(self.llm)
        if self.transfer:  # only when on: outputs written before the option still resume
            fp["transfer"] = {
                # partners with another answer first (transfer.PartnerOption)
                "order": "contrast",
                "partners": self.transfer,
                "min": self.transfer_min,
                "keys": self.transfer_keys,
                "execute": {
                    k: v for k, v in self.execute.items() if k not in ("workers", "progress")
                },
            }
        return fp


def transfer_dir(out: Path) -> Path:
    """The transfer check's samples and executions beside a verified output."""
    return Path(str(out) + ".transfer")


def funnel_path(out: Path) -> Path:
    return Path(str(out) + ".funnel.json")


def compute_funnel(out: Path, questions: int | None = None) -> dict[str, Any]:
    """Funnel counts over everything in the verified output (all runs, not only this one)."""
    samples = valid = ran_ok = correct = kept = judged = checked = failed = 0
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
                tr = r.get("transfer") or {}
                checked += bool(tr.get("checked"))
                failed += tr.get("passed") is False
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
        "transfer_checked": checked,
        "transfer_failed": failed,
        "status": dict(sorted(status.items())),
        "metric": dict(sorted(metrics.items())),
    }


def _print_funnel(fun: dict[str, Any]) -> None:
    from rich.table import Table

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
        *(
            [
                ("checked on other questions", "transfer_checked"),
                ("wrong on other questions", "transfer_failed"),
            ]
            if fun.get("transfer_checked")
            else []
        ),
        ("kept", "kept"),
        ("questions with >= 1 kept", "questions_with_kept"),
    ):
        pct = "" if key.startswith("question") else f"{100 * fun[key] / n:.1f}%"
        table.add_row(label, str(fun[key]), pct)
    console().print(table)


@with_config(ConfigDict(extra="forbid"))
class VerifySummary(TypedDict, total=False):
    """What `vpd verify` returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    written: int
    questions_done_before: int
    questions_pending: int
    rejects: int
    judge_calls: int
    wall_s: float
    samples_per_s: float | None
    funnel: dict[str, Any]


def run_verify(cfg: VerifyConfig, judge: Any = None) -> VerifySummary:
    """Verify every sample (resumable; the unit is a question); returns a summary.

    ``judge`` (tests, or callers holding an LLM already): an object with
    ``judge(items) -> list[bool]`` used instead of building one from ``cfg.llm``.
    """
    t0 = time.time()
    shard = parse_shard(cfg.shard)
    if cfg.out.resolve() in {p.resolve() for p in (cfg.executions, cfg.samples, cfg.questions)}:
        raise VpdError(f"--out {cfg.out} is also an input")
    threshold = {m: threshold_for(m, cfg.threshold) for m in METRICS}
    written = skipped = pending = 0
    with StageOutput(cfg.out, cfg.fingerprint(), shard=shard, force=cfg.force) as so:
        # Index inputs: questions in memory (small); samples/executions by byte offset.
        questions: dict[str, Question] = {}
        pool: list[Question] = []  # the transfer check's partners come from every shard
        for q in read_records(cfg.questions, Question, LabelledRejects(so.rejects, "questions")):
            if so.owns(q.id):
                questions[q.id] = q
            if cfg.transfer:
                pool.append(q)
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
            judge = owned_judge = make_judge(cfg.llm, Path(str(cfg.out) + ".judge.jsonl"))
        judge_calls = 0
        checker = None
        if cfg.transfer and todo:
            checker = TransferCheck(
                pool,
                partners=cfg.transfer,
                min_right=cfg.transfer_min,
                keys=cfg.transfer_keys,
                metric=cfg.metric,
                threshold=cfg.threshold,
                execute=cfg.execute,
                questions=cfg.questions,
                work=transfer_dir(cfg.out),
                force=cfg.force,
            )
        # The transfer check runs the sandbox once per chunk, so its chunks are larger.
        chunk = max(cfg.batch_size, 1024) if checker is not None else cfg.batch_size
        with (
            open(cfg.samples, "rb") as fs,
            open(cfg.executions, "rb") as fe,
            progress_bar("verify", len(todo), unit="q", enabled=cfg.progress) as bar,
        ):
            for start in range(0, len(todo), chunk):
                batch: list[tuple[Question, list[Candidate]]] = []
                for qid in todo[start : start + chunk]:
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
                    for at in range(0, len(asks), cfg.batch_size):
                        part = asks[at : at + cfg.batch_size]
                        verdicts = judge.judge([(q.question, q.answers, c.answer) for q, c in part])
                        judge_calls += len(part)
                        for (_, c), ok in zip(part, verdicts, strict=True):
                            if ok:
                                c.score, c.correct, c.judged, c.reason = 1.0, True, True, ""
                if checker is not None:
                    right = [(q, c) for q, cands in batch for c in cands if c.correct]
                    found = checker.check([(q, c.sample) for q, c in right])
                    for (_, c), verdict in zip(right, found, strict=True):
                        c.transfer = verdict
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
        console().print(
            f"[yellow]{pending} question(s) have samples with no execution yet[/yellow]: "
            "finish `vpd execute` and run verify again (or --allow-missing)"
        )
    fun = compute_funnel(cfg.out, questions=len(questions))
    atomic_write_json(funnel_path(cfg.out), fun, indent=2)
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


def summary_line(cfg: VerifyConfig, s: dict[str, Any]) -> str:
    """What `vpd verify` prints when it is done."""
    f = s["funnel"]
    return (
        f"verify -> {cfg.out}: {s['written']} written; kept {f['kept']}/{f['samples']} "
        f"programs, {f['questions_with_kept']}/{f['questions']} questions with a kept program"
        + (
            f"; {f['transfer_failed']} of {f['transfer_checked']} correct programs checked on "
            "other questions of their template were wrong there"
            if f.get("transfer_checked")
            else ""
        )
        + (f"; {s['rejects']} rejected input lines" if s["rejects"] else "")
    )
