"""`vpd run RECIPE.yaml`: every stage from one recipe, resumably, with a report.

A recipe holds each stage's options in one place; paths are derived from the run
directory, so a recipe never names intermediate files. Each stage follows the
resume contract itself; on top of that a finished stage leaves a marker
(``<run>/stages/<stage>.json``: config fingerprint, summary, wall time), so a re-run
skips finished stages at once and resumes the unfinished one. A marker whose
config differs from the recipe is an error (as for any stage output) unless
``--force``, which re-runs that stage and every stage that reads its output
(``vpd.runpaths.DEPENDS``).

Besides VPD's chain, a recipe may hold the ablation's arms, each measured on the same
test split: ``labels`` (the VLM tuned on human labels only), ``eval`` (the untuned, labels
and vpd VLMs answer directly) and ``programs`` (the program pipeline itself, one greedy
program per question); the report adds the per-type majority baseline and the paired
bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vpd.errors import ConfigMismatch, VpdError
from vpd.options import split_option
from vpd.progress import console
from vpd.report import write_report
from vpd.resources import find_recipe, shipped_recipes
from vpd.runpaths import STAGES, RunPaths, recipe_seeds, stage_outputs, upstream
from vpd.store import atomic_write_json, read_json
from vpd.tune.model import TINY, TINY_OPTIONS, resolve_vlm
from vpd.view import write_run_site

# Fields the pipeline fills from the run directory; a recipe never sets them.
_DERIVED = {
    "out",
    "questions",
    "samples",
    "executions",
    "verified",
    "sft",
    "train_questions",
    "eval_samples",
    "eval_questions",
}

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
        raise VpdError(f"recipe {path}: unknown sections {sorted(unknown)}; known: {STAGES}")
    if not set(recipe) & set(STAGES) and not overrides:
        raise VpdError(f"recipe {path} has no stage sections; stages are {list(STAGES)}")
    for ov in overrides or []:
        key, value = split_option(ov, "--set", "stage.key=value")
        if "." not in key:
            raise VpdError(f"--set expects stage.key=value, got {ov!r}")
        stage, _, field = key.partition(".")
        if stage not in STAGES:
            raise VpdError(f"--set {ov}: unknown stage {stage!r}; known: {STAGES}")
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


def _build(module: str, cls: str, fields: dict[str, Any], stage: str) -> BaseModel:
    mod = importlib.import_module(module)
    config_cls = getattr(mod, cls)
    # Typos must not pass silently, whether or not the stage's model forbids extras.
    unknown = sorted(set(fields) - set(config_cls.model_fields))
    if unknown:
        known = ", ".join(k for k in config_cls.model_fields if k not in _DERIVED)
        raise VpdError(f"recipe section {stage!r}: unknown option(s) {unknown}; known: {known}")
    try:
        return config_cls(**fields)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in (stage, *err['loc']))}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise VpdError(f"recipe option {msgs}") from None


class NotYetKnown(VpdError):
    """A stage's options depend on an upstream output that is not made yet (e.g. the labels
    arm's step budget from the finished vpd arm): they are checked when the stage runs."""


def check_recipe(recipe: dict[str, Any], paths: RunPaths, stages: list[str]) -> None:
    """Build every stage's configs before any stage runs, so a typo or a bad value in a
    recipe or a ``--set`` fails in a second instead of after an hour of earlier stages."""
    for stage in stages:
        try:
            jobs = SPECS[stage].configs(recipe, paths)
        except NotYetKnown:
            continue
        for module, cls, _fn, fields in jobs:
            _build(module, cls, fields, stage)


# ----------------------------------------------------------------------------- stage table


@dataclass(frozen=True)
class StageSpec:
    name: str
    configs: Callable[[dict[str, Any], RunPaths], list[tuple[str, str, str, dict[str, Any]]]]
    """-> list of (module, config class, run function, config fields); run in order."""
    prepare: Callable[[dict[str, Any], RunPaths], None] | None = None
    """Work the stage needs before its jobs that is not an option (not fingerprinted)."""


def _opts(recipe: dict[str, Any], stage: str) -> dict[str, Any]:
    opts = recipe.get(stage) or {}
    if not isinstance(opts, dict):
        raise VpdError(f"recipe section {stage!r} must be a mapping")
    return dict(opts)


def _data(recipe: dict[str, Any], p: RunPaths) -> list[tuple[str, str, str, dict[str, Any]]]:
    o = _opts(recipe, "data")
    source = o.pop("source", "synth")
    if source == "synth":
        return [("vpd.data.synth", "SynthConfig", "run_synth", {"out": p.data_dir, **o})]
    if source == "import":
        # Imported sets bring their own train/test files; each is imported once.
        train = o.pop("train", None)
        test = o.pop("test", None)
        if not train or not test:
            raise VpdError("data.source=import needs data.train and data.test file paths")
        return [
            (
                "vpd.data.importer",
                "ImportConfig",
                "run_import",
                {"input": train, "out": p.train, "split": "train", **o},
            ),
            (
                "vpd.data.importer",
                "ImportConfig",
                "run_import",
                {"input": test, "out": p.test, "split": "test", **o},
            ),
        ]
    raise VpdError(f"data.source must be synth or import, got {source!r}")


def _sample(recipe, p):
    o = _opts(recipe, "sample")
    return [
        ("vpd.sample", "SampleConfig", "run_sample", {"questions": p.train, "out": p.samples, **o})
    ]


def _execute(recipe, p):
    o = _tiny_tools(recipe, _opts(recipe, "execute"))
    return [
        (
            "vpd.execute",
            "ExecuteConfig",
            "run_execute",
            {"samples": p.samples, "questions": p.train, "out": p.executions, **o},
        )
    ]


def _verify(recipe, p):
    o = _opts(recipe, "verify")
    return [
        (
            "vpd.verify",
            "VerifyConfig",
            "run_verify",
            {
                "executions": p.executions,
                "samples": p.samples,
                "questions": p.train,
                "out": p.verified,
                **o,
            },
        )
    ]


def _rationalize(recipe, p):
    o = _opts(recipe, "rationalize")
    return [
        (
            "vpd.rationalize",
            "RationalizeConfig",
            "run_rationalize",
            {"verified": p.verified, "questions": p.train, "out": p.sft, **o},
        )
    ]


def _has_val(recipe: dict[str, Any]) -> bool:
    data = recipe.get("data") or {}
    return bool(data.get("val_frac")) or bool(data.get("val"))


def _arm_tunes(recipe, p, arm: str, sft: Path, extra: dict[str, Any]):
    """One tune job per seed of a VLM arm, each with the validation set when there is one."""
    tune = {**_opts(recipe, "tune"), **extra}
    if _has_val(recipe):
        tune["val"] = p.sft_val
    first, *_ = all_seeds = recipe_seeds(recipe)
    return [
        (
            "vpd.tune",
            "TuneConfig",
            "run_tune",
            {**tune, "seed": s, "sft": sft, "out": p.arm_model(arm, s, s == first)},
        )
        for s in all_seeds
    ]


def _tune(recipe, p):
    jobs = []
    if _has_val(recipe):
        jobs.append(
            (
                "vpd.tune.labels",
                "LabelsConfig",
                "run_labels",
                {"questions": p.val, "out": p.sft_val},
            )
        )
    return jobs + _arm_tunes(recipe, p, "vpd", p.sft, {})


# Options of the `labels` section that are not tune options.
_LABELS_OWN = ("budget",)


def _labels(recipe, p):
    """The labels arm: answers with human labels only, tuned like the vpd arm.

    In the ``question`` layout (VPD's objective, the default) it is the vpd arm's very
    training file with the rationale term weighed 0: the same examples, in the same order,
    for the same number of steps, so the two arms differ only in the rationale loss.

    In the ``records`` layout it tunes on its own file of label records; budget ``steps``
    (default): as many optimizer steps (and examples) as the vpd arm took; ``epochs``: the
    same epochs as the vpd arm, fewer steps since it has no rationale records.
    """
    o = _opts(recipe, "labels")
    budget = o.pop("budget", "steps")
    if budget not in ("steps", "epochs"):
        raise VpdError(f"labels.budget must be steps or epochs, got {budget!r}")
    tune = {**_opts(recipe, "tune"), **o}
    if tune.get("layout", "question") == "question":
        weights = {**(tune.get("task_weights") or {}), "rationale": 0.0}
        return _arm_tunes(recipe, p, "labels", p.sft, {**o, "task_weights": weights})
    if budget == "steps" and int(tune.get("max_steps", -1) or -1) <= 0:
        summary = read_json(p.model / "summary.json")
        if "tune" not in recipe or not summary or not summary.get("steps"):
            raise NotYetKnown(
                "labels.budget=steps takes the vpd arm's step count: the recipe needs a tune "
                "stage that has finished (or set labels.budget: epochs)"
            )
        tune["max_steps"] = int(summary["steps"])
    return [
        (
            "vpd.tune.labels",
            "LabelsConfig",
            "run_labels",
            {"questions": p.train, "out": p.sft_labels},
        ),
        *_arm_tunes(
            recipe, p, "labels", p.sft_labels, {k: tune[k] for k in (*o, "max_steps") if k in tune}
        ),
    ]


def _eval(recipe, p):
    """One eval per VLM arm on the test split: untuned, labels (if that arm is in the
    recipe), vpd (the tune stage's model)."""
    o = _opts(recipe, "eval")
    base = o.pop("base_model", None)
    untuned = o.pop("untuned", True) is not False
    common = {"questions": p.test, "train_questions": p.train, **o}
    jobs = []
    if untuned:
        model = base or _untuned_model(recipe, p)
        jobs.append(("untuned", model, p.preds("untuned")))
    first, *_ = all_seeds = recipe_seeds(recipe)
    for arm in ("labels", "vpd") if "labels" in recipe else ("vpd",):
        for s in all_seeds:
            out = p.preds(arm) if s == first else p.preds(arm, s)
            jobs.append((arm, p.arm_model(arm, s, s == first) / "final", out))
    return [
        ("vpd.evaluate", "EvalConfig", "run_eval", {"model": m, "out": out, **common})
        for _, m, out in jobs
    ]


def _programs(recipe, p):
    """The programs arm: the sample stage's LLM and the execute stage's tools, one greedy
    program per test question (``programs.sample`` / ``programs.execute`` override them)."""
    o = _opts(recipe, "programs")
    sample = {**_opts(recipe, "sample"), **(o.pop("sample", None) or {})}
    execute = _tiny_tools(recipe, {**_opts(recipe, "execute"), **(o.pop("execute", None) or {})})
    fields = {"questions": p.test, "out": p.programs, "sample": sample, "execute": execute, **o}
    return [("vpd.evaluate", "ProgramsConfig", "run_programs", fields)]


def _untuned_model(recipe: dict[str, Any], p: RunPaths) -> str:
    # `tiny`: the very model `vpd tune --init tiny` starts from (same recipes, cached). Only
    # its folder: the tune stage, which eval reads, builds it (configs are built before any
    # stage runs, and building the VLM there would cost minutes for a check).
    tune = recipe.get("tune") or {}
    init = str(tune.get("init", TINY))
    return resolve_vlm(init, tune.get("tiny_build"), tune.get("tiny_lm_layers"), build=False)


def _build_untuned(recipe: dict[str, Any], p: RunPaths) -> None:
    """Make sure the untuned arm's tiny VLM exists (the tune stage built it, unless the
    cache was cleared since): a cache hit in a second."""
    o = recipe.get("eval") or {}
    tune = recipe.get("tune") or {}
    if o.get("untuned", True) is not False and not o.get("base_model"):
        init = str(tune.get("init", TINY))  # any other name is a model given as it is
        resolve_vlm(init, tune.get("tiny_build"), tune.get("tiny_lm_layers"))


def _tiny_tools(recipe: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """Execute options whose ``tools.vqa: tiny`` is the tiny VLM this recipe's tune section
    describes (its ``tiny_build`` / ``tiny_lm_layers``), not the default build. Only the
    ones the recipe sets are added, so a recipe without them keeps its fingerprints."""
    tools = opts.get("tools") or {}
    tune = recipe.get("tune") or {}
    given = {k: tune[k] for k in TINY_OPTIONS if tune.get(k) is not None and k not in tools}
    if tools.get("vqa") != TINY or not given:
        return opts
    return {**opts, "tools": {**tools, **given}}


def _sdvp(recipe: dict[str, Any], p: RunPaths) -> list[tuple[str, str, str, dict[str, Any]]]:
    """SDVP after VPD, with the run's tuned VLM as the teacher (``teacher: tuned``, the
    default) and the tools' VLM as the student (``student``, default: the VLM the run tuned
    from), trained with the run's tune options (``sdvp.tune`` overrides them).

    Its programs are written by the recipe's program writer (``sdvp.sample`` overrides the
    sample options): for the first ``eval_limit`` test questions (the held-out programs),
    and, with ``train_limit``, for that many train questions, executed with the recipe's
    tools, as the programs whose sub-tasks are distilled (without it: the run's own
    executions)."""
    o = _opts(recipe, "sdvp")
    tune = dict(recipe.get("tune") or {})
    init = tune.pop("init", "tiny")
    sample = {**_opts(recipe, "sample"), **(o.pop("sample", None) or {})}
    sample.pop("limit", None)
    eval_limit, train_limit = o.pop("eval_limit", None), o.pop("train_limit", None)
    execute = _opts(recipe, "execute")
    tools = {
        k: v
        for k, v in (execute.get("tools") or {}).items()
        if k not in ("vqa", "vqa_ops", "vqa_view")  # the VLM mode is what sdvp sets
    }
    jobs: list[tuple[str, str, str, dict[str, Any]]] = []
    executions = p.executions
    if train_limit is not None:
        executions = p.sdvp / "train-executions.jsonl"
        train_samples = p.sdvp / "train-samples.jsonl"
        jobs += [
            (
                "vpd.sample",
                "SampleConfig",
                "run_sample",
                {**sample, "questions": p.train, "out": train_samples, "limit": train_limit},
            ),
            (
                "vpd.execute",
                "ExecuteConfig",
                "run_execute",
                {**execute, "samples": train_samples, "questions": p.train, "out": executions},
            ),
        ]
    jobs.append(
        (
            "vpd.sample",
            "SampleConfig",
            "run_sample",
            {**sample, "questions": p.test, "out": p.sdvp_samples, "limit": eval_limit},
        )
    )
    teacher = o.pop("teacher", "tuned")
    fields: dict[str, Any] = {
        "executions": executions,
        "questions": p.train,
        "out": p.sdvp,
        "teacher": str(p.model / "final") if teacher == "tuned" else teacher,
        "student": o.pop("student", init),
        "eval_samples": p.sdvp_samples,
        "eval_questions": p.test,
        "backend": execute.get("backend", "synthetic"),
        "tools": tools,
        "tune": {**tune, **(o.pop("tune", None) or {})},
        **o,
    }
    jobs.append(("vpd.sdvp", "SdvpConfig", "run_sdvp", fields))
    return jobs


SPECS = {
    "data": StageSpec("data", _data),
    "sample": StageSpec("sample", _sample),
    "execute": StageSpec("execute", _execute),
    "verify": StageSpec("verify", _verify),
    "rationalize": StageSpec("rationalize", _rationalize),
    "tune": StageSpec("tune", _tune),
    "labels": StageSpec("labels", _labels),
    "eval": StageSpec("eval", _eval, _build_untuned),
    "programs": StageSpec("programs", _programs),
    "sdvp": StageSpec("sdvp", _sdvp),
}


# ----------------------------------------------------------------------------- running


def _archive(stage: str, p: RunPaths, stamp: str) -> None:
    """Move a stage's outputs aside (never delete): ``<run>/archive/<stamp>/``."""
    dest = p.root / "archive" / stamp
    for out in stage_outputs(stage, p):
        if not out.parent.exists():
            continue
        for f in out.parent.iterdir():
            # Side files (name.*) and the other seeds' folders (name-seedN) go too.
            if f == out or f.name.startswith((out.name + ".", out.name + "-seed")):
                dest.mkdir(parents=True, exist_ok=True)
                f.rename(dest / f.name)
    p.marker(stage).unlink(missing_ok=True)


def _run_jobs(stage: str, jobs: list[tuple[str, str, str, dict[str, Any]]]) -> list[Any]:
    summaries = []
    for module, cls, fn, fields in jobs:
        cfg = _build(module, cls, fields, stage)
        run_fn = getattr(importlib.import_module(module), fn)
        summaries.append(run_fn(cfg))
    return summaries


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
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    con = console()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stages = [s for s in STAGES if (not only or s in only) and s in recipe]
    check_recipe(recipe, paths, stages)
    markers: dict[str, Any] = {}
    ran: set[str] = set()  # stages that ran (not skipped) in this invocation
    for stage in stages:
        jobs = SPECS[stage].configs(recipe, paths)
        cfg_fp = _fingerprint(_portable([(m, c, f, fields) for m, c, f, fields in jobs], str(root)))
        marker = paths.marker(stage)
        # A stage whose input was just (re)made describes an older input: it runs again.
        stale = bool(upstream(stage) & ran)
        if marker.exists():
            old = json.loads(marker.read_text(encoding="utf-8"))
            if old.get("fingerprint") == cfg_fp and not stale:
                con.print(f"[green]✓[/green] {stage}: done (skipped)")
                markers[stage] = old
                continue
            if not force and not stale:
                raise VpdError(
                    f"stage {stage} in {root} was run with other options; restore the "
                    "recipe, use another --run-dir, or --force to re-run it and what follows "
                    "(old outputs are kept under archive/)"
                )
        if stale or marker.exists():
            _archive(stage, paths, stamp)
        con.rule(f"[bold]{stage}")
        t0 = time.time()
        if SPECS[stage].prepare is not None:
            SPECS[stage].prepare(recipe, paths)
        try:
            summaries = _run_jobs(stage, jobs)
        except ConfigMismatch:
            if not force:
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
        # --force of this stage was killed half-way and then resumed without --force.
        ran.add(stage)
        con.print(f"[green]✓[/green] {stage}: finished in {wall:.1f}s")
    if report:
        out = write_report(root)
        con.print(f"report: {out['md']}")
        site = write_run_site(root)
        con.print(f"view: {site.index} ({site.questions} questions; `vpd view --help`)")
    return markers
