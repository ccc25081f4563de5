"""The programs arm of the ablation: the program pipeline answering test questions itself.

The sampler's LLM writes one program per question, greedily (k=1, temperature 0), the
sandbox runs it with the tools, and its answer is scored as a VLM's answer is by
``vpd eval`` (same metrics, same report fields), so the report can set the teacher VPD
distills beside the VLMs.

Outputs in ``--out`` (a folder): ``samples.jsonl`` and ``executions.jsonl`` (the sample and
execute stages' own files, resumed by them), ``preds.jsonl`` (one scored prediction per
question), ``report.json`` and ``timing.json`` (seconds and items of each invocation that did
work, added up over resumes).

``report.json`` also counts the *delegated* answers: those that are ``simple_query``'s reply
to the whole question, i.e. programs that composed nothing and handed the question to the
VQA tool (ViperGPT's fallback). A tuned writer can learn this route wherever the tool
answers whole questions; the count says how much of an arm's accuracy is the tool's.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, with_config

from vpd.errors import VpdError
from vpd.evaluate import AccuracyReport, build_report, has_gold, qtype_of
from vpd.execute import ExecuteConfig, run_execute
from vpd.metrics import Metric, normalize_answer, resolve_metric, score_answer
from vpd.records import Execution, Prediction, Question
from vpd.sample import SampleConfig, run_sample
from vpd.store import atomic_write, atomic_write_json, read_json, read_records


class ProgramsConfig(BaseModel):
    """The program pipeline answering test questions itself (the teacher VPD distills):
    the sampler's LLM writes ONE program per question, greedily (k=1, temperature 0), the
    sandbox runs it with the tools, and its answer is scored like a VLM's. The ``sample``
    and ``execute`` options are those stages' own (``vpd run`` copies the recipe's)."""

    model_config = ConfigDict(extra="forbid")

    questions: Path
    out: Path  # a folder: samples.jsonl, executions.jsonl, preds.jsonl, report.json
    sample: dict[str, Any] = Field(default_factory=dict)
    execute: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(default=None, ge=1)  # the first N questions (file order)
    metric: Metric = "auto"
    force: bool = False
    progress: bool = True


# One greedy program per question: what a user of the program pipeline would run.
_GREEDY = {"k": 1, "temperature": 0.0}
# Sample-stage options that describe which questions are sampled, or how many programs:
# the arm sets these itself.
_ARM_OWNS = {"questions", "out", "k", "temperature", "limit", "shard", "force", "progress"}


def delegated(question: str, e: Execution) -> bool:
    """Whether the program's answer is ``simple_query``'s reply to ``question`` itself: it
    asked the VQA tool the whole question and composed nothing."""
    if e.status != "ok" or e.answer is None:
        return False
    # The VQA normalisation (case, punctuation, articles) on both sides.
    asked = normalize_answer(question)
    for call in reversed(e.trace):
        if call.name == "simple_query" and normalize_answer(call.args.get("question", "")) == asked:
            return normalize_answer(call.value()) == normalize_answer(e.answer)
    return False


def programs_paths(out: Path) -> dict[str, Path]:
    out = Path(out)
    return {
        "samples": out / "samples.jsonl",
        "executions": out / "executions.jsonl",
        "preds": out / "preds.jsonl",
        "report": out / "report.json",
        "timing": out / "timing.json",
    }


@with_config(ConfigDict(extra="forbid"))
class ProgramsSummary(AccuracyReport, total=False):
    """What the programs arm returns (also its report.json).

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    questions_file: str
    questions: int
    statuses: dict[str, int]
    sample_s: float
    execute_s: float
    s_per_question: float | None
    # answers that are simple_query's reply to the whole question: n, right, per_type
    delegated: dict[str, Any]
    sample_summary: dict[str, Any]
    execute_summary: dict[str, Any]


def run_programs(cfg: ProgramsConfig) -> ProgramsSummary:
    """Sample, execute and score one greedy program per question (resumable: the sample and
    execute stages resume themselves); returns the report (also ``OUT/report.json``)."""
    if not cfg.questions.exists():
        raise VpdError(f"--questions file not found: {cfg.questions}")
    paths = programs_paths(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    s_opts = {k: v for k, v in cfg.sample.items() if k not in _ARM_OWNS}
    e_opts = {k: v for k, v in cfg.execute.items() if k not in _ARM_OWNS | {"samples"}}
    timing = read_json(paths["timing"])
    if not isinstance(timing, dict) or cfg.force:
        timing = {}

    def timed(stage: str, fn: Any, conf: Any) -> dict[str, Any]:
        t = time.perf_counter()
        summary = fn(conf)
        # Seconds and items of every invocation that did work add up over resumes.
        if summary.get("written"):
            timing[f"{stage}_s"] = timing.get(f"{stage}_s", 0.0) + time.perf_counter() - t
            timing[stage] = timing.get(stage, 0) + int(summary["written"])
            atomic_write_json(paths["timing"], timing)
        return summary

    common = {"force": cfg.force, "progress": cfg.progress}
    sample_cfg = SampleConfig(
        questions=cfg.questions,
        out=paths["samples"],
        limit=cfg.limit,
        **_GREEDY,
        **s_opts,
        **common,
    )
    sampled = timed("sample", run_sample, sample_cfg)
    exec_cfg = ExecuteConfig(
        samples=paths["samples"],
        questions=cfg.questions,
        out=paths["executions"],
        **e_opts,
        **common,
    )
    executed = timed("execute", run_execute, exec_cfg)

    questions = list(read_records(cfg.questions, Question))[: cfg.limit]
    answers: dict[str, Execution] = {}
    for e in read_records(paths["executions"], Execution, allow_empty=True):
        answers[e.qid] = e
    preds: list[Prediction] = []
    statuses: Counter[str] = Counter()
    handed: dict[str, dict[str, float]] = {}  # per type: delegated answers, right ones
    for q in questions:
        if not has_gold(q):
            continue
        e = answers.get(q.id)
        status = e.status if e is not None else "missing"
        statuses[status] += 1
        answer = e.answer if e is not None and e.status == "ok" else None
        pred = Prediction(
            id=q.id,
            qid=q.id,
            prediction="" if answer is None else str(answer),
            # A program that failed answers nothing: wrong, as for a VLM that says nothing.
            score=score_answer(answer, q, cfg.metric) if answer is not None else 0.0,
            qtype=qtype_of(q),
            metric=resolve_metric(q, cfg.metric),
            raw=status if e is None or e.status != "ok" else "",
        )
        preds.append(pred)
        if e is not None and delegated(q.question, e):
            row = handed.setdefault(pred.qtype, {"n": 0, "right": 0.0})
            row["n"] += 1
            row["right"] += pred.score
    atomic_write(paths["preds"], "".join(p.model_dump_json() + "\n" for p in preds))
    per_item = [timing[f"{st}_s"] / timing[st] for st in ("sample", "execute") if timing.get(st)]
    rep = build_report(
        [p.model_dump() for p in preds],
        None,
        {
            "questions_file": str(cfg.questions),
            "questions": len(questions),
            "statuses": dict(sorted(statuses.items())),
            "sample_s": round(timing.get("sample_s", 0.0), 3),
            "execute_s": round(timing.get("execute_s", 0.0), 3),
            # k=1: a sample and an execution per question; LLM and sandbox start-up included.
            "s_per_question": round(sum(per_item), 4) if per_item else None,
            "delegated": {
                "n": sum(int(v["n"]) for v in handed.values()),
                "right": sum(v["right"] for v in handed.values()),
                "per_type": dict(sorted(handed.items())),
            },
            "sample_summary": sampled,
            "execute_summary": {k: v for k, v in executed.items() if k != "sandbox_layers"},
        },
    )
    atomic_write_json(paths["report"], rep, indent=2, default=str)
    return rep
