"""Run report: the funnel, stage timings, the ablation's accuracy, examples, plots.

Everything is read back from the run directory's files (not from in-memory
summaries), so the report is right after any number of kills and resumes, and can
be re-made at any time with ``vpd status RUN_DIR --report``.

``report.json``:
- ``accuracy.<arm>`` for each arm measured on the test split (``untuned``, ``labels``,
  ``vpd``, ``programs``, ``majority``): ``accuracy``, ``n``, ``per_type`` and
  ``s_per_question`` (wall seconds per question, model loading included);
- ``comparisons``: ``"vpd - labels"``, ``"vpd - majority"``... each the mean difference
  on the questions both arms answered, overall and per question type, with its paired
  bootstrap 95% interval (``vpd.metrics.paired_bootstrap``, seed 0, 10,000 resamples);
- ``speed``: the VLM's seconds per question next to the program pipeline's, and the ratio;
- ``vision``: what the tiny VLM's pretrained tower sees (its probe), when it is the model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpd.errors import VpdError
from vpd.evaluate import (
    ArmScores,
    accuracy_interval,
    arm_scores,
    compare_arms,
    majority_baseline,
    majority_predictions,
    pool_seeds,
    read_preds,
)
from vpd.progress import console
from vpd.records import Question
from vpd.runpaths import ARMS, VLM_ARMS, RunPaths, recipe_seeds, saved_recipe, writer_rounds
from vpd.sdvp.report import markdown_report as sdvp_markdown
from vpd.sdvp.report import report_path as sdvp_report_path
from vpd.stages import STAGES, RunFiles
from vpd.store import atomic_write, atomic_write_json, iter_ids, read_json, read_records
from vpd.writer.rounds import prompt_tokens_per_request

# The comparisons the report makes when both arms are there: VPD against its ablations,
# and the usual instruction tuning against the trivial baseline.
COMPARISONS = (("vpd", "labels"), ("vpd", "majority"), ("labels", "majority"), ("vpd", "programs"))
BOOTSTRAP = {"n_boot": 10_000, "level": 0.95, "seed": 0}


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


def funnel(p: RunPaths) -> dict[str, Any]:
    """Counts at each step from questions to sft records."""
    train_q = _count(p.train)
    samples = valid = 0
    for s in _jsonl(p.samples):
        samples += 1
        valid += bool(s.get("valid", True))
    status: Counter[str] = Counter(e.get("status", "?") for e in _jsonl(p.executions))
    correct = kept = wrong_elsewhere = 0
    kept_q: set[str] = set()
    for v in _jsonl(p.verified):
        # The verifier marks `correct` with its own metric and threshold.
        correct += bool(v.get("correct"))
        wrong_elsewhere += (v.get("transfer") or {}).get("passed") is False
        if v.get("kept"):
            kept += 1
            kept_q.add(v.get("qid"))
    sft: Counter[str] = Counter(r.get("task", "?") for r in _jsonl(p.sft))
    verify_funnel = read_json(Path(str(p.verified) + ".funnel.json"))
    out = {
        "questions_train": train_q,
        "questions_test": _count(p.test),
        "samples": samples,
        "valid_programs": valid,
        "executions": dict(sorted(status.items())),
        "ran_ok": status.get("ok", 0),
        "correct": correct,
        "wrong_on_other_questions": wrong_elsewhere,
        "kept": kept,
        "questions_with_kept_program": len(kept_q),
        "sft_records": dict(sorted(sft.items())),
    }
    if verify_funnel:
        # The verifier's own counts use its threshold and metric: they are authoritative.
        out["verify"] = verify_funnel
    return out


def writer_table(p: RunPaths) -> list[dict[str, Any]] | None:
    """One row per writer round (0: the untuned writer): the training questions sampled and
    those with a kept program, the writer's training examples, the sampler's programs/s
    and prompt tokens per request, and the programs arm of that round's writer on the test
    split (where `programs.rounds` scored it). None without writer rounds."""
    try:
        rounds = writer_rounds(saved_recipe(p))
    except VpdError:
        return None
    if not rounds:
        return None
    rows = []
    first: ArmScores = {}
    for r in range(rounds + 1):
        if r == 0:
            vf = read_json(Path(str(p.verified) + ".funnel.json")) or {}
            ss = ((read_json(p.marker("sample")) or {}).get("summary")) or {}
            asked = int(vf.get("questions_verified") or 0)
            kept = int(vf.get("questions_with_kept") or 0)
            row: dict[str, Any] = {
                "round": 0,
                "questions": asked,
                "questions_with_kept": kept,
                "kept_rate": round(kept / asked, 4) if asked else None,
                "writer_examples": None,
                "programs_per_s": ss.get("samples_per_s") if isinstance(ss, dict) else None,
                "prompt_tokens_per_request": prompt_tokens_per_request(p.samples),
            }
        else:
            marker = read_json(p.writer_round(r) / "round.json") or {}
            row = {"round": r, **(marker.get("summary") or {})}
            row.pop("skipped", None)
        prog = read_json(p.round_programs(r, rounds) / "report.json")
        if prog is not None:
            row["programs"] = _arm(prog)
        scores = arm_scores(read_preds(p.round_programs(r, rounds) / "preds.jsonl"))
        if r and first and scores:
            # This round's writer against the untuned one, on the same test questions.
            row["programs_vs_round0"] = compare_arms(scores, first, **BOOTSTRAP)["all"]
        if r == 0:
            first = scores
        rows.append(row)
    return rows


def stage_table(p: RunPaths) -> list[dict[str, Any]]:
    """One row per stage the run's recipe has (all stages where no recipe is saved)."""
    recipe = saved_recipe(p)
    rows = []
    for stage, entry in STAGES.items():
        if recipe and stage not in recipe:
            continue  # e.g. sdvp in a plain VPD run: never started, nor expected to
        m = read_json(p.marker(stage))
        started = any(o.exists() or any(o.parent.glob(o.name + ".*")) for o in entry.outputs(p))
        state = "done" if m else ("partial" if started else "not started")
        row: dict[str, Any] = {"stage": stage, "state": state}
        if m:
            row["wall_s"] = m.get("wall_s")
            row["summary"] = m.get("summary")
        rows.append(row)
    return rows


def progress_counts(p: RunPaths) -> dict[str, str]:
    """Per-stage `done/expected` figures for `vpd status` (cheap: ids only); the expected
    counts come from the run's saved recipe (sample k and limit, eval limit)."""
    files = RunFiles(p, saved_recipe(p))
    return {name: stage.progress(files) for name, stage in STAGES.items()}


def status_table(run_dir: Path) -> Any:
    """The table `vpd status` prints: each stage's state, progress and wall time."""
    from rich.table import Table

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VpdError(f"run directory not found: {run_dir}")
    if not (run_dir / "recipe.yaml").exists():
        raise VpdError(
            f"{run_dir} is not a vpd run directory (no recipe.yaml); start one with `vpd run`"
        )
    p = RunPaths(run_dir)
    counts = progress_counts(p)
    table = Table(title=f"vpd run: {run_dir}")
    for col in ("stage", "state", "progress", "wall (s)"):
        table.add_column(col)
    colors = {"done": "green", "partial": "yellow", "not started": "dim"}
    for row in stage_table(p):
        st = row["state"]
        table.add_row(
            row["stage"], f"[{colors[st]}]{st}[/]", counts[row["stage"]], str(row.get("wall_s", ""))
        )
    return table


def _arm(rep: dict[str, Any]) -> dict[str, Any]:
    """The fields every arm reports (see the module docstring)."""
    out = {
        "accuracy": rep.get("accuracy"),
        "n": rep.get("n"),
        "per_type": {
            t: {"accuracy": v.get("accuracy"), "n": v.get("n")}
            for t, v in (rep.get("per_type") or {}).items()
        },
        "s_per_question": rep.get("s_per_question"),
    }
    keys = ("model", "statuses", "sample_s", "execute_s", "wall_s", "train_questions", "delegated")
    for k in keys:
        if k in rep:
            out[k] = rep[k]
    return out


def _questions(path: Path) -> list[Question]:
    return list(read_records(path, Question, allow_empty=True)) if path.exists() else []


def _seed_runs(p: RunPaths, arm: str, seeds: list[int]) -> list[tuple[int, Path, dict]]:
    """``(seed, predictions, their report)`` of a VLM arm at each seed it was evaluated."""
    runs = []
    for i, s in enumerate(seeds if arm != "untuned" else seeds[:1]):
        preds = p.vlm_preds(arm) if i == 0 else p.preds(arm, s)
        rep = read_json(Path(str(preds) + ".report.json"))
        if rep:
            runs.append((s, preds, rep))
    return runs


def _pooled_arm(runs: list[tuple[int, Path, dict]]) -> dict[str, Any]:
    """An arm tuned at several seeds: the mean of its seeds' accuracies (overall and per
    type; the same as pooling every seed's answers) and each seed's own."""
    arms = [_arm(rep) for _, _, rep in runs]
    out = dict(arms[0])

    def mean(vals: list[Any]) -> float | None:
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 6) if vals else None

    out["accuracy"] = mean([a["accuracy"] for a in arms])
    out["s_per_question"] = mean([a.get("s_per_question") for a in arms])
    out["per_type"] = {
        t: {"accuracy": mean([a["per_type"].get(t, {}).get("accuracy") for a in arms]), "n": v["n"]}
        for t, v in arms[0]["per_type"].items()
    }
    out["seeds"] = [
        {
            "seed": s,
            "accuracy": a["accuracy"],
            "per_type": {t: v["accuracy"] for t, v in a["per_type"].items()},
        }
        for (s, _, _), a in zip(runs, arms, strict=True)
    ]
    return out


def arm_results(
    p: RunPaths,
) -> tuple[dict[str, Any], dict[str, ArmScores], dict[str, dict[int, ArmScores]]]:
    """``(accuracy per arm, per-question scores per arm, per-seed scores per tuned arm)``
    from the run's files. An arm tuned at several seeds (the recipe's ``seeds``) scores
    each question by its mean over the seeds."""
    acc: dict[str, Any] = {}
    scores: dict[str, ArmScores] = {}
    by_seed: dict[str, dict[int, ArmScores]] = {}
    try:
        seeds = recipe_seeds(saved_recipe(p))
    except VpdError:
        seeds = [0]
    for arm in VLM_ARMS:
        runs = _seed_runs(p, arm, seeds)
        if not runs:
            continue
        by_seed[arm] = {s: arm_scores(list(read_preds(preds))) for s, preds, _ in runs}
        if len(runs) == 1:
            acc[arm] = _arm(runs[0][2])
            scores[arm] = by_seed[arm][runs[0][0]]
        else:
            acc[arm] = _pooled_arm(runs)
            scores[arm] = pool_seeds(list(by_seed[arm].values()))
    rep = read_json(p.programs / "report.json")
    if rep:
        acc["programs"] = _arm(rep)
        scores["programs"] = arm_scores(list(read_preds(p.programs / "preds.jsonl")))
    train, test = _questions(p.train), _questions(p.test)
    if train and test and acc:
        acc["majority"] = {**_arm(majority_baseline(train, test)), "s_per_question": 0.0}
        scores["majority"] = {
            qid: (qtype, score)
            for qid, (qtype, _, score) in majority_predictions(train, test).items()
        }
    for arm, sc in scores.items():  # each bar's 95% interval (questions resampled)
        if arm in acc and sc:
            lo_hi = accuracy_interval(sc, **BOOTSTRAP)
            acc[arm]["interval"] = list(lo_hi) if lo_hi else None
    return {a: acc[a] for a in ARMS if a in acc}, scores, by_seed


def accuracy(p: RunPaths) -> dict[str, Any]:
    return arm_results(p)[0]


def comparisons(
    scores: dict[str, ArmScores], by_seed: dict[str, dict[int, ArmScores]] | None = None
) -> dict[str, Any]:
    """Paired bootstrap intervals of the differences in :data:`COMPARISONS`. Where both arms
    were tuned at the same several seeds, ``all``/``per_type`` are the pooled comparison
    (per-question scores averaged over seeds), also under ``pooled``, and ``seeds`` holds
    each seed's own (vpd at seed s against labels at seed s)."""
    out = {}
    by_seed = by_seed or {}
    for a, b in COMPARISONS:
        if a not in scores or b not in scores:
            continue
        res = {"a": a, "b": b, **compare_arms(scores[a], scores[b], **BOOTSTRAP)}
        common = sorted(set(by_seed.get(a, {})) & set(by_seed.get(b, {})))
        if len(common) > 1:
            res["pooled"] = {"all": res["all"], "per_type": res["per_type"], "seeds": common}
            res["seeds"] = {
                str(s): compare_arms(by_seed[a][s], by_seed[b][s], **BOOTSTRAP)["all"]
                for s in common
            }
        out[f"{a} - {b}"] = res
    return out


def tune_summary(p: RunPaths) -> dict[str, Any] | None:
    """The vpd arm's validation loss after each epoch (``val_loss``), and every tuned
    arm's and seed's (``arms``), from their ``summary.json``."""
    try:
        seeds = recipe_seeds(saved_recipe(p))
    except VpdError:
        seeds = [0]
    arms: dict[str, dict[str, Any]] = {}
    for arm in ("vpd", "labels"):
        for i, s in enumerate(seeds):
            summ = read_json(p.arm_model(arm, s, i == 0) / "summary.json")
            if summ:
                arms.setdefault(arm, {})[str(s)] = {
                    "val_loss": summ.get("val_loss") or [],
                    "steps": summ.get("steps"),
                    "train_s": summ.get("train_s"),
                }
    if not arms:
        return None
    first = next(iter((arms.get("vpd") or {}).values()), {})
    return {"val_loss": first.get("val_loss", []), "arms": arms}


def speed(acc: dict[str, Any]) -> dict[str, Any]:
    """Seconds per question of each arm that computes something, and programs / vpd."""
    out: dict[str, Any] = {
        a: acc[a]["s_per_question"]
        for a in ARMS
        if a in acc and a != "majority" and acc[a].get("s_per_question")
    }
    if out.get("vpd") and out.get("programs"):
        out["programs_over_vpd"] = round(out["programs"] / out["vpd"], 2)
    return out


def vision(p: RunPaths) -> dict[str, Any] | None:
    """The probe of the tiny VLM's pretrained tower, when the run tuned the tiny VLM."""
    init = str((read_json(p.model / "summary.json") or {}).get("init", ""))
    if not init.startswith("tiny (") or not init.endswith(")"):
        return None
    probe = read_json(Path(init[len("tiny (") : -1]) / "vision_probe.json")
    return {"model": init[len("tiny (") : -1], "probe": probe} if probe else None


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
        _accuracy_figure(acc, series, p.root / "accuracy.png")
        made.append("accuracy.png")
    return made


def _accuracy_figure(acc: dict[str, Any], series: dict[str, dict[str, float]], png: Path) -> None:
    """Left: each arm's test accuracy with its 95% interval as an error bar, its seeds as
    dots; right: accuracy per question type (seeds as dots)."""
    import matplotlib.pyplot as plt

    arms = list(series)
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    types = sorted({t for v in series.values() for t in v} - {"all"})
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(max(10, 1.6 * len(types) + 4), 4), gridspec_kw={"width_ratios": [1, 3]}
    )
    for i, arm in enumerate(arms):
        rep = acc[arm]
        y = series[arm]["all"]
        iv = rep.get("interval")
        err = [[y - iv[0]], [iv[1] - y]] if iv else None
        ax0.bar(i, y, color=colors[arm], yerr=err, capsize=4, alpha=0.85)
        ax0.text(i, (iv[1] if iv else y) + 0.01, f"{100 * y:.1f}", ha="center", fontsize=8)
        for seed in rep.get("seeds") or []:
            ax0.plot(i, seed["accuracy"], "o", color="black", ms=3)
    ax0.set_xticks(range(len(arms)), arms, rotation=20)
    ax0.set_ylim(0, 1)
    ax0.set_ylabel("test accuracy")
    ax0.set_title("all questions (95% interval; dots: seeds)", fontsize=9)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        xs = [j + i * width for j in range(len(types))]
        ax1.bar(
            xs, [series[arm].get(t, 0) for t in types], width=width, label=arm, color=colors[arm]
        )
        for seed in acc[arm].get("seeds") or []:
            ys = [seed["per_type"].get(t) for t in types]
            ax1.plot(
                [x for x, v in zip(xs, ys, strict=True) if v is not None],
                [v for v in ys if v is not None],
                "o",
                color="black",
                ms=2,
            )
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=20)
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8, ncol=len(arms))
    ax1.set_title("per question type, each arm on the same test split", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _per_type_series(acc: dict[str, Any]) -> dict[str, dict[str, float]]:
    series: dict[str, dict[str, float]] = {}
    for arm, rep in acc.items():
        if rep.get("accuracy") is None:
            continue
        per = {t: float(v["accuracy"]) for t, v in (rep.get("per_type") or {}).items()}
        series[arm] = {"all": float(rep["accuracy"]), **per}
    return series


def write_report(root: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and PNG plots into the run directory."""
    p = RunPaths(Path(root))
    fun = funnel(p)
    stages = stage_table(p)
    acc, scores, by_seed = arm_results(p)
    ex = examples(p)
    plots = _plots(p, fun, acc)
    report = {
        "run_dir": str(p.root),
        "funnel": fun,
        "stages": stages,
        "accuracy": acc,
        "comparisons": comparisons(scores, by_seed),
        "tune": tune_summary(p),
        "speed": speed(acc),
        "vision": vision(p),
        "examples": ex,
        "plots": plots,
    }
    sdvp = read_json(sdvp_report_path(p.sdvp))
    if sdvp is not None:
        report["sdvp"] = sdvp
    writer = writer_table(p)
    if writer is not None:
        report["writer"] = writer
    atomic_write_json(p.root / "report.json", report, indent=2, default=str)
    md = p.root / "report.md"
    atomic_write(md, render_markdown(report))
    return {"json": p.root / "report.json", "md": md}


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _fmt_acc(rep: dict[str, Any] | None) -> str:
    return _pct((rep or {}).get("accuracy"))


def _pts(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):+.1f}"


def _interval(c: dict[str, Any] | None) -> str:
    """A difference and its interval in points, e.g. ``+22.0 [+18.0, +26.0]``."""
    if not c or c.get("diff") is None:
        return "-"
    return f"{_pts(c['diff'])} [{_pts(c['lo'])}, {_pts(c['hi'])}]"


_ARM_TEXT = {
    "untuned": "the tiny VLM before tuning",
    "labels": "tuned on the answer task with human labels only",
    "vpd": "tuned on VPD's mix (answer + rationale where a program was kept, labels elsewhere)",
    "programs": "the program pipeline: one greedy program per question, run with the tools",
    "majority": "the training split's most common answer for the question's type",
}


def accuracy_markdown(r: dict[str, Any]) -> list[str]:
    """The ablation's tables: accuracy per arm and type, the intervals, the speeds."""
    acc = r["accuracy"]
    if not acc:
        return []
    lines = ["## Test accuracy", ""]
    arms = list(acc)
    types = sorted({t for rep in acc.values() for t in (rep.get("per_type") or {})})
    lines += ["| type | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    lines.append("| **all** | " + " | ".join(f"**{_fmt_acc(acc[a])}**" for a in arms) + " |")
    lines.append("| questions | " + " | ".join(str(acc[a].get("n") or 0) for a in arms) + " |")
    for t in types:
        cells = []
        for a in arms:
            v = (acc[a].get("per_type") or {}).get(t)
            cells.append(f"{_fmt_acc(v)} ({v['n']})" if v else "-")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    seeded = [a for a in arms if acc[a].get("seeds")]
    if seeded:
        lines.append("")
        for a in seeded:
            each = ", ".join(f"seed {x['seed']} {_pct(x['accuracy'])}" for x in acc[a]["seeds"])
            lines.append(f"`{a}` is the mean of its seeds: {each}.")
    lines += [""] + [f"- `{a}`: {_ARM_TEXT.get(a, a)}" for a in arms] + [""]
    comps = r.get("comparisons") or {}
    if comps:
        lines += [
            "## VPD against its ablations",
            "",
            "Difference in accuracy (points) on the questions both arms answered, with its "
            "paired bootstrap 95% interval (questions resampled; seed 0, 10,000 resamples). "
            "An interval that excludes 0 is marked *.",
            "",
            "| comparison | type | n | difference | 95% interval |",
            "|---|---|---|---|---|",
        ]
        for name, c in comps.items():
            rows = [("**all**", c["all"])] + list(c["per_type"].items())
            if c.get("seeds"):  # pooled over seeds first, then each seed alone
                rows = (
                    [("**all** (seeds pooled)", c["all"])]
                    + [(f"all, seed {s}", v) for s, v in c["seeds"].items()]
                    + list(c["per_type"].items())
                )
            for t, v in rows:
                mark = " *" if v.get("excludes_zero") else ""
                lines.append(
                    f"| {name} | {t} | {v['n']} | {_pts(v['diff'])}{mark} | "
                    f"[{_pts(v['lo'])}, {_pts(v['hi'])}] |"
                )
        lines.append("")
    val = (r.get("tune") or {}).get("arms") or {}
    if val:
        lines += [
            "## Validation loss after each epoch",
            "",
            "| arm | seed | " + "loss by epoch |",
            "|---|---|---|",
        ]
        for arm, runs in val.items():
            for seed, v in runs.items():
                losses = ", ".join(f"{x['loss']:.4f} ({x['epoch']:g})" for x in v["val_loss"])
                lines.append(f"| {arm} | {seed} | {losses or '-'} |")
        lines.append("")
    sp = r.get("speed") or {}
    if sp:
        lines += ["## Seconds per question", "", "| arm | s / question |", "|---|---|"]
        lines += [f"| {a} | {v:.3f} |" for a, v in sp.items() if a in acc]
        if "programs_over_vpd" in sp:
            lines += [
                "",
                f"The distilled VLM answers **{sp['programs_over_vpd']:.1f}x** faster per "
                "question than the program pipeline it learned from (wall time on this "
                "machine, loading included).",
            ]
        lines.append("")
    return lines


def _delegated(d: dict[str, Any] | None) -> str:
    if not d:  # an arm scored before the count existed
        return "-"
    return f"{int(d['n'])} ({float(d['right']):g} right)"


def writer_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The per-round table of the program writer's expert iteration."""
    types = sorted({t for row in rows for t in ((row.get("programs") or {}).get("per_type") or {})})
    lines = [
        "## The program writer, round by round",
        "",
        "Round 0 is the untuned writer; round r is tuned on the kept programs of rounds "
        "< r (and, with writer.spread, their rewrites that answer other training questions "
        "of a template right). Kept: sampled training questions with a kept program. "
        "Programs: that round's writer, one greedy program per test question. Delegated: "
        "of its answers, those that are simple_query's reply to the whole question (the "
        "program composed nothing), and how many of them are right.",
        "",
        "| round | kept | writer examples | programs/s | prompt tokens | programs | "
        "vs round 0 (95% CI) | delegated | " + " | ".join(types) + " |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(types),
    ]
    for row in rows:
        prog = row.get("programs") or {}
        per = prog.get("per_type") or {}
        kept = f"{row.get('questions_with_kept', '-')}/{row.get('questions', '-')}"
        rate = row.get("programs_per_s")
        examples = str(row.get("writer_examples") or "-")
        if row.get("spread_questions") is not None:  # writer.spread: of them, spread ones
            examples += f" ({row['spread_questions']} spread)"
        cells = [
            str(row["round"]),
            f"{kept} ({_pct(row.get('kept_rate'))})",
            examples,
            "-" if rate is None else f"{float(rate):.2f}",
            str(row.get("prompt_tokens_per_request") or "-"),
            _fmt_acc(prog) if prog else "-",
            _interval(row.get("programs_vs_round0")),
            _delegated(prog.get("delegated")),
            *[_pct((per.get(t) or {}).get("accuracy")) for t in types],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


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
        *(
            [
                f"| correct, but wrong on other questions of their template | "
                f"{f['wrong_on_other_questions']} |"
            ]
            if f.get("wrong_on_other_questions")
            else []
        ),
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
    lines += [""] + accuracy_markdown(r)
    vis = (r.get("vision") or {}).get("probe")
    if vis:
        a = vis.get("accuracy") or {}
        lines += [
            "## What the vision tower sees",
            "",
            "Linear probes on the frozen features of the tiny VLM's pretrained tower, "
            f"{vis.get('test_objects')} objects in {vis.get('test_scenes')} unseen scenes: "
            + ", ".join(f"{k} {_pct(v)}" for k, v in a.items())
            + ".",
            "",
        ]
    if r.get("writer"):
        lines += writer_markdown(r["writer"])
    if r.get("sdvp"):
        lines += ["", "## SDVP: stepwise distillation into the tools", ""]
        lines += sdvp_markdown(r["sdvp"])
        lines.append("")  # its notes end in a list: a heading right after would join it
    if r["examples"]:
        lines += ["## Example rationales", ""]
        for e in r["examples"]:
            lines += [f"**{e['id']}**: {e['prompt']}", "", f"> {e['rationale']}", ""]
    if r["plots"]:
        lines += ["## Plots", ""] + [f"![{x}]({x})" for x in r["plots"]]
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


class StatusConfig(BaseModel):
    """Show each stage's progress in a run directory."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path = Field(description="A run directory made by `vpd run`.")
    report: bool = Field(False, description="Also (re)write report.md/json.")


def run_status(cfg: StatusConfig) -> dict[str, Any]:
    """`vpd status`: the stage table, and the report rewritten when asked."""
    console().print(status_table(cfg.run_dir))
    return write_report(cfg.run_dir) if cfg.report else {}


def status_line(cfg: StatusConfig, written: dict[str, Any]) -> str:
    return f"report: {written['md']}" if written else ""


class ReportConfig(BaseModel):
    """Write a run's report, or turn human ratings into their table.

    The ratings table: the share of rationales rated factual, consistent with the answer,
    and with the answer right, overall and per question type, each with its bootstrap 95%
    interval (as the VPD paper's human evaluation)."""

    model_config = ConfigDict(extra="forbid")

    run_dir: Path | None = Field(None, description="A run directory: (re)write its report.")
    ratings: list[Path] = Field(
        default_factory=list, description="Ratings JSONL from `vpd view --rate` (repeatable)."
    )
    out: Path | None = Field(
        None, description="With --ratings: also write the table to OUT (Markdown) and its JSON."
    )


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """`vpd report`: the run's report and/or the ratings table (printed to stdout)."""
    from vpd.view.command import ratings_report

    if cfg.run_dir is None and not cfg.ratings:
        raise VpdError("give a RUN_DIR or --ratings FILE (see `vpd report --help`)")
    done: dict[str, Any] = {}
    if cfg.run_dir is not None:
        if not (cfg.run_dir / "recipe.yaml").exists():
            raise VpdError(f"{cfg.run_dir} is not a vpd run directory (no recipe.yaml)")
        done["md"] = write_report(cfg.run_dir)["md"]
    if cfg.ratings:
        print(ratings_report(cfg.ratings, cfg.out)["markdown"], end="")
    return done


def report_line(cfg: ReportConfig, done: dict[str, Any]) -> str:
    return f"report: {done['md']}" if done.get("md") else ""
