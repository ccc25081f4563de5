"""`vpd run RECIPE.yaml`: every stage from one recipe, resumably, with a report.

A recipe holds each stage's options in one place; paths are derived from the run
directory, so a recipe never names intermediate files. Each stage follows the
resume contract itself; on top of that a finished stage leaves a marker
(``<run>/stages/<stage>.json``: config fingerprint, summary, wall time), so a re-run
skips finished stages at once and resumes the unfinished one. A marker whose
config differs from the recipe is an error (as for any stage output) unless
``--force``, which re-runs that stage and every stage that reads its output
(each stage's ``depends`` in ``vpd.stages``).

Besides VPD's chain, a recipe may hold the ablation's arms, each measured on the same
test split: ``labels`` (the VLM tuned on human labels only), ``eval`` (the untuned, labels
and vpd VLMs answer directly) and ``programs`` (the program pipeline itself, one greedy
program per question); the report adds the per-type majority baseline and the paired
bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vpd.errors import ConfigMismatch, VpdError
from vpd.options import split_option
from vpd.progress import console
from vpd.report import write_report
from vpd.resources import find_recipe, shipped_recipes
from vpd.runpaths import RunPaths
from vpd.stages import STAGES, Job, NotYetKnown, upstream
from vpd.store import atomic_write_json
from vpd.view import write_run_site

# ----------------------------------------------------------------------------- recipe


def _read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One recipe file, with ``extends: BASE.yaml`` resolved: the base's sections, each
    updated key by key with this file's (a section set to ``null`` is dropped)."""
    path = Path(path)
    if not path.exists():
        raise VpdError(f"recipe not found: {path} (shipped, by name: {shipped_recipes()})")
    if path.is_dir():
        raise VpdError(f"a recipe is a YAML file, got a directory: {path}")
    if path.resolve() in seen:
        raise VpdError(f"recipe {path}: `extends` loops back to itself")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VpdError(f"recipe {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(recipe, dict):
        raise VpdError(f"recipe {path} must be a mapping of stage -> options")
    base_name = recipe.pop("extends", None)
    if base_name is None:
        return recipe
    base = _read_recipe(path.parent / str(base_name), (*seen, path.resolve()))
    for key, value in recipe.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def load_recipe(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML recipe and apply ``stage.key=value`` overrides (values parsed as YAML)."""
    recipe = _read_recipe(find_recipe(path))  # a bare name may be a shipped recipe
    unknown = set(recipe) - set(STAGES) - {"name", "run_dir", "description", "seeds"}
    if unknown:
        raise VpdError(f"recipe {path}: unknown sections {sorted(unknown)}; known: {tuple(STAGES)}")
    if not set(recipe) & set(STAGES) and not overrides:
        raise VpdError(f"recipe {path} has no stage sections; stages are {list(STAGES)}")
    for ov in overrides or []:
        key, value = split_option(ov, "--set", "stage.key=value")
        if "." not in key:
            raise VpdError(f"--set expects stage.key=value, got {ov!r}")
        stage, _, field = key.partition(".")
        if stage not in STAGES:
            raise VpdError(f"--set {ov}: unknown stage {stage!r}; known: {tuple(STAGES)}")
        recipe.setdefault(stage, {})
        recipe[stage][field] = value
    return recipe


def _fingerprint(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _portable(obj: Any, root: str) -> Any:
    """``obj`` with the run directory written as ``<run>``: a copied or moved run dir keeps
    its finished stages (try a variant with ``cp -r runs/a runs/b`` + ``--set ... --force``)."""
    if isinstance(obj, dict):
        return {k: _portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable(v, root) for v in obj]
    if isinstance(obj, (str, Path)):
        text = str(obj)
        if text == root or text.startswith(root + os.sep):
            return "<run>" + text[len(root) :]
    return obj


def stage_fingerprint(jobs: list[Job], root: Path) -> str:
    """A stage marker's fingerprint: its jobs' runners and fields, the run directory written
    as ``<run>``."""
    return _fingerprint(_portable([job.key() for job in jobs], str(root)))


def check_recipe(recipe: dict[str, Any], paths: RunPaths, stages: list[str]) -> None:
    """Build every stage's configs before any stage runs, so a typo or a bad value in a
    recipe or a ``--set`` fails in a second instead of after an hour of earlier stages."""
    for stage in stages:
        try:
            jobs = STAGES[stage].jobs(recipe, paths)
        except NotYetKnown:
            continue
        for job in jobs:
            job.config(stage)


# ----------------------------------------------------------------------------- running


def _archive(stage: str, p: RunPaths, stamp: str, keep: Iterable[Path] = ()) -> None:
    """Move a stage's outputs aside (never delete): ``<run>/archive/<stamp>/``; those in
    ``keep`` stay."""
    dest = p.root / "archive" / stamp
    kept = set(keep)
    for out in STAGES[stage].outputs(p):
        if out in kept or not out.parent.exists():
            continue
        for f in out.parent.iterdir():
            # Side files (name.*) and the other seeds' folders (name-seedN) go too.
            if f == out or f.name.startswith((out.name + ".", out.name + "-seed")):
                # Under its path in the run (writer/round1/programs apart from programs).
                target = dest / f.relative_to(p.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                f.rename(target)
    p.marker(stage).unlink(missing_ok=True)


def _skipped(summary: Any) -> bool:
    return isinstance(summary, dict) and summary.get("skipped") is True


def _run_jobs(stage: str, jobs: list[Job], force: bool | None = None) -> list[Any]:
    return [job.run(stage, force) for job in jobs]


def run_pipeline(
    recipe_path: Path,
    run_dir: Path | None = None,
    *,
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    force: bool = False,
    report: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every stage of a recipe; returns the per-stage markers.

    ``force``: a stage whose options changed is re-run from scratch, and so is every
    stage that reads its output (they consumed the old one); old outputs go to
    ``<run>/archive``. Any stage that runs (not skipped) makes its readers run again too.
    """
    recipe = load_recipe(recipe_path, overrides)
    root = Path(run_dir or recipe.get("run_dir") or f"runs/{Path(recipe_path).stem}")
    paths = RunPaths(root)
    paths.stages.mkdir(parents=True, exist_ok=True)
    paths.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    con = console()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stages = [s for s in STAGES if (not only or s in only) and s in recipe]
    check_recipe(recipe, paths, stages)
    markers: dict[str, Any] = {}
    ran: set[str] = set()  # stages that ran (not skipped) in this invocation
    for stage in stages:
        jobs = STAGES[stage].jobs(recipe, paths)
        cfg_fp = stage_fingerprint(jobs, root)
        marker = paths.marker(stage)
        # A stage whose input was just (re)made describes an older input: it runs again.
        why = upstream(stage, set(recipe)) & ran
        stale = bool(why)
        # An incremental stage (the writer's rounds) keeps what its changed options leave
        # valid: its jobs hold their own fingerprints and run again only where they differ.
        incremental = STAGES[stage].incremental and not stale
        same_options = True
        if marker.exists():
            old = json.loads(marker.read_text(encoding="utf-8"))
            same_options = old.get("fingerprint") == cfg_fp
            if same_options and not stale:
                con.print(f"[green]✓[/green] {stage}: done (skipped)")
                markers[stage] = old
                continue
            if not force and not stale and not incremental:
                raise VpdError(
                    f"stage {stage} in {root} was run with other options; restore the "
                    "recipe, use another --run-dir, or --force to re-run it and what follows "
                    "(old outputs are kept under archive/)"
                )
        if stale or (marker.exists() and not incremental):
            keeps = STAGES[stage].keeps
            keep = keeps(paths, why) if stale and same_options and keeps else []
            _archive(stage, paths, stamp, keep)
        con.rule(f"[bold]{stage}")
        t0 = time.time()
        prepare = STAGES[stage].prepare
        if prepare is not None:
            prepare(recipe, paths)
        try:
            summaries = _run_jobs(stage, jobs, force if incremental else None)
        except ConfigMismatch:
            if not force or incremental:
                raise
            # A half-done stage under old options: set it aside and start it over.
            _archive(stage, paths, stamp)
            summaries = _run_jobs(stage, jobs)
        wall = time.time() - t0
        rec = {
            "stage": stage,
            "fingerprint": cfg_fp,
            "wall_s": round(wall, 2),
            "finished": time.time(),
            "summary": summaries[0] if len(summaries) == 1 else summaries,
        }
        atomic_write_json(marker, rec, indent=2, default=str)
        markers[stage] = rec
        # This stage's output may be new, so the markers of the stages that read it (even
        # ones whose options match) describe an older input: they run again, e.g. after a
        # --force of this stage was killed half-way and then resumed without --force. An
        # incremental stage whose every job found its output done changed nothing.
        if not (incremental and all(_skipped(s) for s in summaries)):
            ran.add(stage)
        con.print(f"[green]✓[/green] {stage}: finished in {wall:.1f}s")
    if report:
        out = write_report(root)
        con.print(f"report: {out['md']}")
        site = write_run_site(root)
        con.print(f"view: {site.index} ({site.questions} questions; `vpd view --help`)")
    return markers


class RunConfig(BaseModel):
    """Run the whole pipeline from one recipe; re-run the same command to resume."""

    model_config = ConfigDict(extra="forbid")

    recipe: Path = Field(description="YAML recipe (see recipes/), or a shipped recipe's name.")
    run_dir: Path | None = Field(None, description="Run directory (default: the recipe's).")
    overrides: list[str] = Field(
        default_factory=list,
        description="Override a recipe option: stage.key=value (repeatable).",
        json_schema_extra={"flag": "set"},
    )
    only: list[str] = Field(default_factory=list, description="Run only these stages (repeatable).")
    force: bool = Field(
        False, description="Re-run stages whose options changed, and the stages that read them."
    )


def run_command(cfg: RunConfig) -> dict[str, Any]:
    """`vpd run`: :func:`run_pipeline` with the command's options."""
    bad = [s for s in cfg.only if s not in STAGES]
    if bad:
        raise VpdError(f"--only: unknown stage(s) {bad}; stages are {list(STAGES)}")
    return run_pipeline(
        cfg.recipe, cfg.run_dir, overrides=cfg.overrides, only=cfg.only or None, force=cfg.force
    )
