"""The eval step: the held-out programs with each tools' VLM, and the accuracy comparisons.

The held-out programs (``eval_samples`` on ``eval_questions``) are executed and verified
(``vpd execute`` / ``vpd verify``, each resuming its own output under ``OUT/eval/<name>/``)
with the tools' VLM before distillation (``before``), with each student (``after``; with
``ablation`` the other adapter's too), and with the teacher as the tool (``teacher``, a
ceiling, seeing the region as the teacher step showed it). Program accuracy (per question:
the mean score of its programs) overall and per question type, paired bootstrap intervals
of each difference, and the cross-task check (``held_out``: accuracy on the held-out types
must not drop beyond its interval).
"""

from __future__ import annotations

import json
from typing import Any

from vpd.evaluate import qtype_of
from vpd.execute import ExecuteConfig, run_execute
from vpd.metrics import paired_bootstrap
from vpd.progress import console
from vpd.records import Question
from vpd.sdvp.config import SdvpConfig, SdvpRun, variants
from vpd.sdvp.tune import model_path, tune_config
from vpd.store import read_records
from vpd.verify import VerifyConfig, run_verify


def evaluate_tools(cfg: SdvpConfig, name: str, vqa: str, view: str) -> dict[str, list[float]]:
    """Execute + verify the held-out programs with ``vqa`` as the tools' VLM; per question,
    the scores of its programs (a program that failed scores 0)."""
    assert cfg.eval_samples is not None and cfg.eval_questions is not None
    folder = cfg.out / "eval" / name
    tools = {**cfg.tools, "vqa": vqa, "vqa_ops": ",".join(cfg.ops), "vqa_view": view}
    if cfg.device != "auto":
        tools.setdefault("device", cfg.device)
    run_execute(
        ExecuteConfig(
            samples=cfg.eval_samples,
            questions=cfg.eval_questions,
            out=folder / "executions.jsonl",
            backend=cfg.backend,
            tools=tools,
            timeout=cfg.timeout,
            workers=cfg.workers,
            force=cfg.force,
            progress=cfg.progress,
        )
    )
    run_verify(
        VerifyConfig(
            executions=folder / "executions.jsonl",
            samples=cfg.eval_samples,
            questions=cfg.eval_questions,
            out=folder / "verified.jsonl",
            policy="all",
            force=cfg.force,
            progress=False,
        )
    )
    scores: dict[str, list[float]] = {}
    with open(folder / "verified.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                v = json.loads(line)
                scores.setdefault(v["qid"], []).append(float(v.get("score") or 0.0))
    return scores


def _acc(per_q: dict[str, float], qids: list[str]) -> float | None:
    return round(sum(per_q[q] for q in qids) / len(qids), 4) if qids else None


def accuracy_table(
    per_q: dict[str, float], qtypes: dict[str, str], qids: list[str]
) -> dict[str, Any]:
    """Program accuracy over ``qids``, overall and per question type."""
    types: dict[str, list[str]] = {}
    for q in qids:
        types.setdefault(qtypes[q], []).append(q)
    return {
        "accuracy": _acc(per_q, qids),
        "n": len(qids),
        "per_type": {
            t: {"accuracy": _acc(per_q, ids), "n": len(ids)} for t, ids in sorted(types.items())
        },
    }


def _interval(r: dict[str, Any]) -> list[float]:
    return [round(r["lo"], 4), round(r["hi"], 4)] if r["n"] else [0.0, 0.0]


def compare(
    base: dict[str, float], other: dict[str, float], qids: list[str], cfg: SdvpConfig
) -> dict[str, Any]:
    """Paired difference other - base over ``qids`` with its bootstrap interval."""
    a = [base[q] for q in qids]
    b = [other[q] for q in qids]
    diff = round((sum(b) - sum(a)) / len(qids), 4) if qids else None
    return {
        "n": len(qids),
        "diff": diff,
        "ci95": _interval(paired_bootstrap(b, a, n_boot=cfg.bootstrap, seed=cfg.seed)),
    }


def build_report(
    cfg: SdvpConfig,
    conditions: dict[str, dict[str, float]],
    qtypes: dict[str, str],
    main: str,
) -> dict[str, Any]:
    """before / after / teacher / held_out (+ ablation variants) from per-question scores."""
    qids = sorted(set.intersection(*(set(c) for c in conditions.values())))
    held = set(cfg.holdout_types)
    held_q = [q for q in qids if qtypes[q] in held]
    seen_q = [q for q in qids if qtypes[q] not in held]
    before = conditions["before"]
    rep: dict[str, Any] = {"questions": len(qids)}
    for name, per_q in conditions.items():
        key = "after" if name == main else name
        entry = accuracy_table(per_q, qtypes, qids)
        if name != "before":
            entry["vs_before"] = compare(before, per_q, qids, cfg)
        if name not in ("before", "teacher", main):
            entry["vs_after"] = compare(conditions[main], per_q, qids, cfg)
            rep.setdefault("ablation", {})[name] = entry
            continue
        rep[key] = entry
    after = conditions[main]
    if seen_q:
        rep["distilled_types"] = {
            "types": sorted({qtypes[q] for q in seen_q}),
            "before": _acc(before, seen_q),
            "after": _acc(after, seen_q),
            **compare(before, after, seen_q, cfg),
        }
    if held:
        check: dict[str, Any] = {"types": sorted(held), "n": len(held_q)}
        if held_q:
            cmp = compare(before, after, held_q, cfg)
            check.update(before=_acc(before, held_q), after=_acc(after, held_q), **cmp)
            # "Must not drop beyond its interval": the drop is within noise when the 95%
            # interval of after - before still reaches 0.
            check["ok"] = cmp["ci95"][1] >= 0
        else:
            check["ok"] = None
            check["note"] = "no held-out question of these types among the eval questions"
        rep["held_out"] = check
    return rep


def eval_step(run: SdvpRun) -> None:
    """Accuracy of the held-out programs with each tools' VLM, into the report (only a note
    without held-out programs)."""
    cfg = run.cfg
    if cfg.eval_samples is None or cfg.eval_questions is None:
        run.report["note"] = (
            "no held-out programs given (--eval-samples/--eval-questions): no accuracy"
        )
        return
    tcfg = tune_config(cfg, variants(cfg)[0])
    student0 = model_path(cfg.student, tcfg.model_dump())
    conds = {"before": (student0, cfg.tool_view), "teacher": (run.teacher, cfg.view)}
    for v in variants(cfg):
        conds[v.name] = (str(cfg.out / v.name / "student" / "final"), cfg.tool_view)
    scores = {}
    for name, (vqa, view) in conds.items():
        if cfg.progress:
            console().rule(f"sdvp eval: {name} tools")
        per = evaluate_tools(cfg, name, vqa, view)
        scores[name] = {q: sum(s) / len(s) for q, s in per.items()}
    qtypes = {q.id: qtype_of(q) for q in read_records(cfg.eval_questions, Question)}
    run.report.update(build_report(cfg, scores, qtypes, variants(cfg)[0].name))
