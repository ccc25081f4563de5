"""Run report: the funnel, stage timings, accuracy before/after tuning, examples, plots.

Everything is read back from the run directory's files (not from in-memory
summaries), so the report is right after any number of kills and resumes, and can
be re-made at any time with ``vpd status RUN_DIR --report``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from vpd.runpaths import STAGES, RunPaths, stage_outputs
from vpd.sample import SampleConfig
from vpd.sdvp import markdown_report as sdvp_markdown
from vpd.sdvp import report_path as sdvp_report_path
from vpd.store import iter_ids


def _jsonl(path: Path):
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def _count(path: Path) -> int:
    return sum(1 for _ in iter_ids(path))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def funnel(p: RunPaths) -> dict[str, Any]:
    """Counts at each step from questions to sft records."""
    train_q = _count(p.train)
    samples = valid = 0
    for s in _jsonl(p.samples):
        samples += 1
        valid += bool(s.get("valid", True))
    status: Counter[str] = Counter(e.get("status", "?") for e in _jsonl(p.executions))
    correct = kept = 0
    kept_q: set[str] = set()
    for v in _jsonl(p.verified):
        # The verifier marks `correct` with its own metric and threshold.
        correct += bool(v.get("correct"))
        if v.get("kept"):
            kept += 1
            kept_q.add(v.get("qid"))
    sft: Counter[str] = Counter(r.get("task", "?") for r in _jsonl(p.sft))
    verify_funnel = _read_json(Path(str(p.verified) + ".funnel.json"))
    out = {
        "questions_train": train_q,
        "questions_test": _count(p.test),
        "samples": samples,
        "valid_programs": valid,
        "executions": dict(sorted(status.items())),
        "ran_ok": status.get("ok", 0),
        "correct": correct,
        "kept": kept,
        "questions_with_kept_program": len(kept_q),
        "sft_records": dict(sorted(sft.items())),
    }
    if verify_funnel:
        # The verifier's own counts use its threshold and metric: they are authoritative.
        out["verify"] = verify_funnel
    return out


def stage_table(p: RunPaths) -> list[dict[str, Any]]:
    """One row per stage the run's recipe has (all stages where no recipe is saved)."""
    recipe = _run_recipe(p)
    rows = []
    for stage in STAGES:
        if recipe and stage not in recipe:
            continue  # e.g. sdvp in a plain VPD run: never started, nor expected to
        m = _read_json(p.marker(stage))
        started = any(
            o.exists() or any(o.parent.glob(o.name + ".*")) for o in stage_outputs(stage, p)
        )
        state = "done" if m else ("partial" if started else "not started")
        row: dict[str, Any] = {"stage": stage, "state": state}
        if m:
            row["wall_s"] = m.get("wall_s")
            row["summary"] = m.get("summary")
        rows.append(row)
    return rows


def _run_recipe(p: RunPaths) -> dict[str, Any]:
    """The recipe `vpd run` saved in the run directory (overrides applied), or {}."""
    try:
        recipe = yaml.safe_load((p.root / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _at_most(n: int, limit: Any) -> int:
    return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n


def progress_counts(p: RunPaths) -> dict[str, str]:
    """Per-stage `done/expected` figures for `vpd status` (cheap: ids only).

    The expected counts come from the run's recipe (sample k and limit, eval limit): the
    samples' meta does not hold k, which may grow on resume.
    """
    recipe = _run_recipe(p)
    sample = recipe.get("sample") or {}
    k = int(sample.get("k", SampleConfig.model_fields["k"].default))
    nq = _count(p.train)
    nt = _count(p.test)
    ns = _count(p.samples)
    n_eval = _at_most(nt, (recipe.get("eval") or {}).get("limit"))
    counts = {
        "data": f"{nq} train / {nt} test questions",
        "sample": f"{ns}"
        + (f"/{_at_most(nq, sample.get('limit')) * k}" if nq else "")
        + " programs",
        "execute": f"{_count(p.executions)}/{ns} programs",
        "verify": f"{_count(p.verified)}/{ns} samples",
        "rationalize": f"{_count(p.sft)} sft records",
        "tune": _tune_progress(p),
        "eval": ", ".join(f"{w}: {_count(p.preds(w))}/{n_eval}" for w in ("untuned", "tuned")),
        "sdvp": _sdvp_progress(p),
    }
    return counts


def _sdvp_progress(p: RunPaths) -> str:
    subs = _count(p.sdvp / "subtasks.jsonl")
    answered = [f"{d.name}: {_count(d / 'teacher.jsonl')}" for d in sorted(p.sdvp.glob("*/"))]
    answered = [a for a in answered if not a.endswith(": 0")]
    if not subs:
        return "no sub-tasks yet"
    return f"{subs} sub-tasks; teacher answers " + (", ".join(answered) or "none yet")


def _tune_progress(p: RunPaths) -> str:
    final = p.model / "final"
    if final.exists():
        return "final model saved"
    ckpts = sorted(p.model.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    return f"last checkpoint: {ckpts[-1].name}" if ckpts else "no checkpoint yet"


def accuracy(p: RunPaths) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for which in ("untuned", "tuned"):
        rep = _read_json(Path(str(p.preds(which)) + ".report.json"))
        if rep:
            out[which] = rep
    return out


def examples(p: RunPaths, n: int = 3) -> list[dict[str, str]]:
    ex = []
    for r in _jsonl(p.sft):
        if r.get("task") != "rationale":
            continue
        msgs = r.get("messages", [])
        user = _text(msgs[0]) if msgs else ""
        ans = _text(msgs[-1]) if msgs else ""
        ex.append({"id": r.get("id", ""), "prompt": user, "rationale": ans})
        if len(ex) >= n:
            break
    return ex


def _text(msg: dict[str, Any]) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    return " ".join(part.get("text", "") for part in c or [] if part.get("type") == "text")


def _loss_points(p: RunPaths) -> list[tuple[float, float]]:
    pts = []
    for r in _jsonl(p.model / "loss.jsonl"):
        if "loss" in r and "step" in r:
            pts.append((float(r["step"]), float(r["loss"])))
    return pts


def _plots(p: RunPaths, fun: dict[str, Any], acc: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    names = ["questions", "samples", "valid", "ran ok", "correct", "kept"]
    vals = [
        fun["questions_train"],
        fun["samples"],
        fun["valid_programs"],
        fun["ran_ok"],
        fun["correct"],
        fun["kept"],
    ]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, vals, color="#4C72B0")
    for i, v in enumerate(vals):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_title("VPD funnel")
    fig.tight_layout()
    fig.savefig(p.root / "funnel.png", dpi=100)
    plt.close(fig)
    made.append("funnel.png")

    pts = _loss_points(p)
    if pts:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([x for x, _ in pts], [y for _, y in pts])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("vpd tune")
        fig.tight_layout()
        fig.savefig(p.root / "loss.png", dpi=100)
        plt.close(fig)
        made.append("loss.png")

    series = _per_type_series(acc)
    if series:
        types = sorted({t for s in series.values() for t in s})
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / len(series)
        for i, (label, s) in enumerate(series.items()):
            xs = [j + i * width for j in range(len(types))]
            ax.bar(xs, [s.get(t, 0) for t in types], width=width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=20)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("test accuracy per question type")
        fig.tight_layout()
        fig.savefig(p.root / "accuracy.png", dpi=100)
        plt.close(fig)
        made.append("accuracy.png")
    return made


def _per_type_series(acc: dict[str, Any]) -> dict[str, dict[str, float]]:
    series: dict[str, dict[str, float]] = {}
    for which, rep in acc.items():
        per = rep.get("per_type") or {}
        series[which] = {t: float(v.get("accuracy", 0)) for t, v in per.items()}
        base = rep.get("majority_baseline") or {}
        if base.get("per_type") and "majority" not in series:
            series["majority"] = {
                t: float(v.get("accuracy", 0) if isinstance(v, dict) else v)
                for t, v in base["per_type"].items()
            }
    return series


def write_report(root: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and PNG plots into the run directory."""
    p = RunPaths(Path(root))
    fun = funnel(p)
    stages = stage_table(p)
    acc = accuracy(p)
    ex = examples(p)
    plots = _plots(p, fun, acc)
    report = {
        "run_dir": str(p.root),
        "funnel": fun,
        "stages": stages,
        "accuracy": acc,
        "examples": ex,
        "plots": plots,
    }
    sdvp = _read_json(sdvp_report_path(p.sdvp))
    if sdvp is not None:
        report["sdvp"] = sdvp
    (p.root / "report.json").write_text(json.dumps(report, indent=2, default=str))
    md = p.root / "report.md"
    md.write_text(render_markdown(report), encoding="utf-8")
    return {"json": p.root / "report.json", "md": md}


def _fmt_acc(rep: dict[str, Any] | None) -> str:
    if not rep or rep.get("accuracy") is None:
        return "-"
    return f"{100 * float(rep['accuracy']):.1f}%"


def render_markdown(r: dict[str, Any]) -> str:
    f = r["funnel"]
    lines = [f"# VPD run report: `{r['run_dir']}`", "", "## Funnel", ""]
    lines += ["| step | count |", "|---|---|"]
    lines += [
        f"| training questions | {f['questions_train']} |",
        f"| sampled programs | {f['samples']} |",
        f"| valid programs | {f['valid_programs']} |",
        f"| executed ok | {f['ran_ok']} |",
        f"| correct | {f['correct']} |",
        f"| kept | {f['kept']} |",
        f"| questions with a kept program | {f['questions_with_kept_program']} |",
    ]
    for task, n in f["sft_records"].items():
        lines.append(f"| sft records ({task}) | {n} |")
    if f["executions"]:
        lines += [
            "",
            "Execution status: " + ", ".join(f"{k} {v}" for k, v in f["executions"].items()),
        ]
    lines += ["", "## Stages", "", "| stage | state | wall (s) | throughput |", "|---|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['state']} | {s.get('wall_s', '-')} | {_throughput(s)} |")
    acc = r["accuracy"]
    if acc:
        lines += ["", "## Test accuracy", ""]
        types = sorted({t for rep in acc.values() for t in (rep.get("per_type") or {})})
        base = next(
            (rep.get("majority_baseline") for rep in acc.values() if rep.get("majority_baseline")),
            None,
        )
        cols = list(acc) + (["majority"] if base else [])
        lines += ["| type | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        row = ["**all**"] + [_fmt_acc(acc[c]) for c in acc] + ([_fmt_acc(base)] if base else [])
        lines.append("| " + " | ".join(row) + " |")
        for t in types:
            cells = [_fmt_acc((acc[c].get("per_type") or {}).get(t)) for c in acc]
            if base:
                bt = (base.get("per_type") or {}).get(t)
                cells.append(_fmt_acc(bt if isinstance(bt, dict) else {"accuracy": bt}))
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if r.get("sdvp"):
        lines += ["", "## SDVP: stepwise distillation into the tools", ""]
        lines += sdvp_markdown(r["sdvp"])
    if r["examples"]:
        lines += ["", "## Example rationales", ""]
        for e in r["examples"]:
            lines += [f"**{e['id']}**: {e['prompt']}", "", f"> {e['rationale']}", ""]
    if r["plots"]:
        lines += ["", "## Plots", ""] + [f"![{x}]({x})" for x in r["plots"]]
    return "\n".join(lines) + "\n"


def _throughput(stage: dict[str, Any]) -> str:
    s = stage.get("summary")
    if isinstance(s, list):
        s = s[-1] if s else None
    if not isinstance(s, dict):
        return "-"
    for k, v in s.items():
        if k.endswith("_per_s") or k.endswith("per_s") or k == "throughput":
            unit = k.replace("_per_s", "").replace("per_s", "") or "items"
            return f"{v:.2f} {unit}/s" if isinstance(v, (int, float)) else str(v)
    return "-"
