"""`vpd sdvp`'s steps in the order they run, and :func:`run_sdvp`, which walks them up to
``until`` (as `vpd run` walks its stages) and writes the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.sdvp.collect import collect_step
from vpd.sdvp.config import STEP_NAMES, SdvpConfig, SdvpRun, variants
from vpd.sdvp.eval import eval_step
from vpd.sdvp.report import report_path
from vpd.sdvp.sft import sft_step
from vpd.sdvp.teacher import teacher_step
from vpd.sdvp.tune import tune_step
from vpd.store import atomic_write_json, parse_shard


@dataclass(frozen=True)
class Step:
    """One step: it reads what the steps before it left in the run and adds its part."""

    name: str
    run: Callable[[SdvpRun], None]


# `until` (SdvpConfig) names one of these: the steps up to it run, as `vpd run --only`.
STEPS: tuple[Step, ...] = (
    Step("collect", collect_step),
    Step("teacher", teacher_step),
    Step("sft", sft_step),
    Step("tune", tune_step),
    Step("eval", eval_step),
)


def _check_inputs(cfg: SdvpConfig) -> None:
    for flag, p in (("EXECUTIONS", cfg.executions), ("--questions", cfg.questions)):
        if not Path(p).is_file():
            raise VpdError(f"{flag} file not found: {p}")
    if (cfg.eval_samples is None) != (cfg.eval_questions is None):
        raise VpdError("--eval-samples and --eval-questions go together (held-out programs)")
    for flag, p in (("--eval-samples", cfg.eval_samples), ("--eval-questions", cfg.eval_questions)):
        if p is not None and not Path(p).is_file():
            raise VpdError(f"{flag} file not found: {p}")
    if cfg.tune_recipe is not None and not Path(cfg.tune_recipe).is_file():
        raise VpdError(f"--tune-recipe not found: {cfg.tune_recipe}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise VpdError(f"--out must be a folder, got a file: {cfg.out}")
    parse_shard(cfg.shard)  # a bad --shard fails before any work


def new_report(cfg: SdvpConfig) -> dict[str, Any]:
    """The report's head: the run's settings and one entry per adapter variant, which the
    steps fill in."""
    return {
        "teacher_model": cfg.teacher,
        "student_model": cfg.student,
        "ops": cfg.ops,
        "tool_view": cfg.tool_view,
        "holdout_types": cfg.holdout_types,
        "variants": {
            v.name: {"view": v.view, "rewrite": v.rewrite, "adapter": v.describe()}
            for v in variants(cfg)
        },
    }


@with_config(ConfigDict(extra="forbid"))
class SdvpReport(TypedDict, total=False):
    """What `vpd sdvp` returns (also DIR/sdvp.json); which keys are there depends on
    ``until``.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    teacher_model: str
    student_model: str
    ops: list[str]
    tool_view: str
    holdout_types: list[str]
    variants: dict[str, Any]
    subtasks: dict[str, Any]
    questions: int
    before: dict[str, Any]
    after: dict[str, Any]
    teacher: dict[str, Any]
    held_out: dict[str, Any]
    distilled_types: dict[str, Any]
    ablation: Any
    wall_s: float


def run_sdvp(cfg: SdvpConfig) -> SdvpReport:
    """Run (or resume) SDVP up to ``cfg.until``; returns (and writes) the report."""
    t0 = time.time()
    _check_inputs(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    run = SdvpRun(cfg, new_report(cfg), teacher=cfg.teacher)
    for step in STEPS[: STEP_NAMES.index(cfg.until) + 1]:
        step.run(run)
    run.report["wall_s"] = round(time.time() - t0, 2)
    atomic_write_json(report_path(cfg.out), run.report, indent=2, default=str)
    return run.report
