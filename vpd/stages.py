"""The stage registry of `vpd run`: one typed entry per stage, in run order.

An entry says everything the pipeline, the report and `vpd status` need of a stage: its
name, the runners its jobs use (a stage module's config class and run function, imported
here, never named by a string), how a recipe becomes its jobs (the run directory's files
filled in), the files and folders it writes, the stages it reads from, and its progress
line. `vpd.pipeline`, `vpd.report` and the import-layer test loop over :data:`STAGES`;
adding a stage is its module plus one entry here.

This module sits at the pipeline's layer (it imports the stage modules); the files of a run
directory stay in the lower :mod:`vpd.runpaths`, which every layer may read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from vpd.data.importer import ImportConfig, run_import
from vpd.data.synth import SynthConfig, run_synth
from vpd.errors import VpdError
from vpd.evaluate import EvalConfig, run_eval
from vpd.execute import ExecuteConfig, run_execute
from vpd.programs import ProgramsConfig, run_programs
from vpd.rationalize import RationalizeConfig, run_rationalize
from vpd.runpaths import VLM_ARMS, RunPaths, recipe_seeds, writer_rounds
from vpd.sample import SampleConfig, run_sample
from vpd.sdvp import SdvpConfig, run_sdvp
from vpd.sdvp.collect import subtasks_path
from vpd.sdvp.teacher import teacher_path
from vpd.store import iter_ids, read_json
from vpd.tune import TuneConfig, run_tune
from vpd.tune.labels import LabelsConfig, run_labels
from vpd.tune.model import TINY, TINY_OPTIONS, resolve_vlm
from vpd.verify import VerifyConfig, run_verify
from vpd.writer.rounds import ROUND_OPTIONS, RoundConfig, run_round, writer_sample_options

C = TypeVar("C", bound=BaseModel)

# Fields the pipeline fills from the run directory; a recipe never sets them.
DERIVED = {
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

# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Runner(Generic[C]):
    """A stage module's entry point: its config class and the function that runs one."""

    config: type[C]
    run: Callable[[C], Any]
    marker_module: str
    """The module a stage marker names for this runner: where it was imported from when the
    first runs were made. Hashed into the marker's fingerprint only (never imported), and
    kept when the code moves, so finished runs still resume."""

    def key(self) -> tuple[str, str, str]:
        """(module, config class, run function): what a marker fingerprints besides fields."""
        return (self.marker_module, self.config.__name__, self.run.__name__)


@dataclass(frozen=True)
class Job:
    """One run of a runner with the fields a recipe (and the run directory) give it."""

    runner: Runner[Any]
    fields: dict[str, Any]

    def key(self) -> tuple[str, str, str, dict[str, Any]]:
        """What the stage marker's fingerprint is computed over."""
        return (*self.runner.key(), self.fields)

    def config(self, stage: str, force: bool | None = None) -> BaseModel:
        """The job's config; unknown or invalid options are a one-line error naming the
        recipe section (``stage``). ``force``: set on the config (not a fingerprinted field;
        for the jobs of an incremental stage)."""
        cls = self.runner.config
        # Typos must not pass silently, whether or not the stage's model forbids extras.
        unknown = sorted(set(self.fields) - set(cls.model_fields))
        if unknown:
            known = ", ".join(k for k in cls.model_fields if k not in DERIVED)
            raise VpdError(f"recipe section {stage!r}: unknown option(s) {unknown}; known: {known}")
        extra = {} if force is None else {"force": force}
        try:
            return cls(**self.fields, **extra)
        except ValidationError as e:
            msgs = "; ".join(
                f"{'.'.join(str(x) for x in (stage, *err['loc']))}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
            raise VpdError(f"recipe option {msgs}") from None

    def run(self, stage: str, force: bool | None = None) -> Any:
        return self.runner.run(self.config(stage, force))


@dataclass
class RunFiles:
    """What a progress line reads: a run's files and its saved recipe. Counts of record ids
    are kept, as several stages count the same file (the samples: sample, execute, verify)."""

    paths: RunPaths
    recipe: dict[str, Any]
    _counts: dict[Path, int] = field(default_factory=dict)

    def count(self, path: Path) -> int:
        if path not in self._counts:
            self._counts[path] = sum(1 for _ in iter_ids(path))
        return self._counts[path]


Recipe = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    """One stage of `vpd run`."""

    name: str
    runners: tuple[Runner[Any], ...]
    """The runners its jobs use (all a stage runs; the import-layer test reads them)."""
    build: Callable[[Recipe, RunPaths], list[Job]]
    """The recipe -> the stage's jobs, run in order (may raise :class:`NotYetKnown`)."""
    outputs: Callable[[RunPaths], list[Path]]
    """The files/folders it writes (its side files share the name as a prefix)."""
    depends: tuple[str, ...]
    """The stages whose outputs it reads (all of them: the data files too): when one of them
    (or what they read, through the recipe's stages) runs again, so must it."""
    progress: Callable[[RunFiles], str]
    """Its `done/expected` line for `vpd status` (cheap: ids only)."""
    prepare: Callable[[Recipe, RunPaths], None] | None = None
    """Work it needs before its jobs that is not an option (not fingerprinted)."""
    incremental: bool = False
    """Its jobs keep their own fingerprints (the writer's rounds): when its options change,
    the pipeline runs its jobs again with ``force`` instead of archiving the stage, and each
    job skips when its own options are unchanged."""
    keeps: Callable[[RunPaths, set[str]], list[Path]] | None = None
    """Of its outputs, those still valid when it runs again only because these upstream
    stages ran (its options unchanged): left in place, not archived, so their jobs find
    them done (each still checks its own fingerprint)."""

    def jobs(self, recipe: Recipe, paths: RunPaths) -> list[Job]:
        jobs = self.build(recipe, paths)
        stray = [j.runner.key() for j in jobs if j.runner not in self.runners]
        if stray:  # the entry's runners must say all the stage runs
            raise VpdError(f"stage {self.name}: jobs of runners it does not declare: {stray}")
        return jobs


class NotYetKnown(VpdError):
    """A stage's options depend on an upstream output that is not made yet (e.g. the labels
    arm's step budget from the finished vpd arm): they are checked when the stage runs."""


# ----------------------------------------------------------------------------- runners

SYNTH = Runner(SynthConfig, run_synth, "vpd.data.synth")
IMPORT = Runner(ImportConfig, run_import, "vpd.data.importer")
SAMPLE = Runner(SampleConfig, run_sample, "vpd.sample")
EXECUTE = Runner(ExecuteConfig, run_execute, "vpd.execute")
VERIFY = Runner(VerifyConfig, run_verify, "vpd.verify")
RATIONALIZE = Runner(RationalizeConfig, run_rationalize, "vpd.rationalize")
LABELS = Runner(LabelsConfig, run_labels, "vpd.tune.labels")
TUNE = Runner(TuneConfig, run_tune, "vpd.tune")
EVAL = Runner(EvalConfig, run_eval, "vpd.evaluate")
# In vpd.programs since; the markers of runs made before name vpd.evaluate.
PROGRAMS = Runner(ProgramsConfig, run_programs, "vpd.evaluate")
SDVP = Runner(SdvpConfig, run_sdvp, "vpd.sdvp")
ROUND = Runner(RoundConfig, run_round, "vpd.writer.rounds")

# ----------------------------------------------------------------------------- builders


def _opts(recipe: Recipe, stage: str) -> dict[str, Any]:
    opts = recipe.get(stage) or {}
    if not isinstance(opts, dict):
        raise VpdError(f"recipe section {stage!r} must be a mapping")
    return dict(opts)


def _data(recipe: Recipe, p: RunPaths) -> list[Job]:
    o = _opts(recipe, "data")
    source = o.pop("source", "synth")
    if source == "synth":
        return [Job(SYNTH, {"out": p.data_dir, **o})]
    if source == "import":
        # Imported sets bring their own train/test files; each is imported once.
        train = o.pop("train", None)
        test = o.pop("test", None)
        if not train or not test:
            raise VpdError("data.source=import needs data.train and data.test file paths")
        return [
            Job(IMPORT, {"input": train, "out": p.train, "split": "train", **o}),
            Job(IMPORT, {"input": test, "out": p.test, "split": "test", **o}),
        ]
    raise VpdError(f"data.source must be synth or import, got {source!r}")


def _sample(recipe: Recipe, p: RunPaths) -> list[Job]:
    o = _opts(recipe, "sample")
    return [Job(SAMPLE, {"questions": p.train, "out": p.samples, **o})]


def _execute(recipe: Recipe, p: RunPaths) -> list[Job]:
    o = _tiny_tools(recipe, _opts(recipe, "execute"))
    return [Job(EXECUTE, {"samples": p.samples, "questions": p.train, "out": p.executions, **o})]


def _verify_opts(recipe: Recipe) -> dict[str, Any]:
    """The verify section; with ``transfer`` its partner programs run under the execute
    section's options (the tools the run's programs ran with) unless ``verify.execute``
    names its own."""
    o = _opts(recipe, "verify")
    if o.get("transfer") and "execute" not in o:
        o["execute"] = _tiny_tools(recipe, _opts(recipe, "execute"))
    return o


def _verify(recipe: Recipe, p: RunPaths) -> list[Job]:
    o = _verify_opts(recipe)
    fields = {
        "executions": p.executions,
        "samples": p.samples,
        "questions": p.train,
        "out": p.verified,
        **o,
    }
    return [Job(VERIFY, fields)]


def _writer(recipe: Recipe, p: RunPaths) -> list[Job]:
    """Expert iteration: ``writer.rounds`` rounds, each tuning the writer on the kept
    programs of the rounds before it (round 0: the run's own), then sampling the training
    questions with it (the sample section's options; ``writer.limit``, ``k`` and
    ``temperature`` override them), executing and verifying (those sections' options).
    The test and validation questions are excluded from its data (an error if present)."""
    rounds = writer_rounds(recipe)
    o = _opts(recipe, "writer")
    sample = _opts(recipe, "sample")
    for key in ROUND_OPTIONS:
        if key in o and key != "rounds":
            sample[key] = o[key]
    spread = o.pop("spread", 0)  # a round's option, not the tuning's
    writer = {k: v for k, v in o.items() if k not in ROUND_OPTIONS}
    exclude = [p.test, *([p.val] if _has_val(recipe) else [])]
    execute = _tiny_tools(recipe, _opts(recipe, "execute"))
    verify = _verify_opts(recipe)
    jobs, verified = [], [p.verified]
    for r in range(1, rounds + 1):
        fields = {
            "round": r,
            "out": p.writer_round(r),
            "verified": list(verified),
            "questions": p.train,
            "exclude": exclude,
            "previous": p.writer_round(r - 1) if r > 1 else None,
            "writer": writer,
            "sample": sample,
            "execute": execute,
            "verify": verify,
            **({"spread": spread} if spread else {}),
        }
        jobs.append(Job(ROUND, fields))
        verified.append(p.writer_round(r) / "verified.jsonl")
    return jobs


def writer_sample(recipe: Recipe, p: RunPaths, sample: dict[str, Any], r: int) -> dict[str, Any]:
    """Sample options for the writer of round ``r`` (0: the untuned one, ``sample``)."""
    if r <= 0:
        return sample
    return writer_sample_options(sample, _opts(recipe, "writer"), p.writer_round(r))


def _rationalize(recipe: Recipe, p: RunPaths) -> list[Job]:
    """The rationales of the final writer's kept programs (the last writer round's)."""
    o = _opts(recipe, "rationalize")
    _, _, verified = p.final_programs(writer_rounds(recipe))
    return [Job(RATIONALIZE, {"verified": verified, "questions": p.train, "out": p.sft, **o})]


def _has_val(recipe: Recipe) -> bool:
    data = recipe.get("data") or {}
    return bool(data.get("val_frac")) or bool(data.get("val"))


def _arm_tunes(
    recipe: Recipe, p: RunPaths, arm: str, sft: Path, extra: dict[str, Any]
) -> list[Job]:
    """One tune job per seed of a VLM arm, each with the validation set when there is one."""
    tune = {**_opts(recipe, "tune"), **extra}
    if _has_val(recipe):
        tune["val"] = p.sft_val
    first, *_ = all_seeds = recipe_seeds(recipe)
    return [
        Job(TUNE, {**tune, "seed": s, "sft": sft, "out": p.arm_model(arm, s, s == first)})
        for s in all_seeds
    ]


def _tune(recipe: Recipe, p: RunPaths) -> list[Job]:
    jobs = []
    if _has_val(recipe):
        jobs.append(Job(LABELS, {"questions": p.val, "out": p.sft_val}))
    return jobs + _arm_tunes(recipe, p, "vpd", p.sft, {})


def _labels(recipe: Recipe, p: RunPaths) -> list[Job]:
    """The labels arm: answers with human labels only, tuned like the vpd arm.

    In the ``question`` layout (VPD's objective, the default) it is the vpd arm's very
    training file with the rationale term weighed 0: the same examples, in the same order,
    for the same number of steps, so the two arms differ only in the rationale loss.

    In the ``records`` layout it tunes on its own file of label records; budget ``steps``
    (default): as many optimizer steps (and examples) as the vpd arm took; ``epochs``: the
    same epochs as the vpd arm, fewer steps since it has no rationale records.
    """
    o = _opts(recipe, "labels")
    budget = o.pop("budget", "steps")  # the one option of the section that is not tune's
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
        Job(LABELS, {"questions": p.train, "out": p.sft_labels}),
        *_arm_tunes(
            recipe, p, "labels", p.sft_labels, {k: tune[k] for k in (*o, "max_steps") if k in tune}
        ),
    ]


def _eval(recipe: Recipe, p: RunPaths) -> list[Job]:
    """One eval per VLM arm on the test split: untuned, labels (if that arm is in the
    recipe), vpd (the tune stage's model)."""
    o = _opts(recipe, "eval")
    base = o.pop("base_model", None)
    untuned = o.pop("untuned", True) is not False
    common = {"questions": p.test, "train_questions": p.train, **o}
    jobs = []
    if untuned:
        model = base or _untuned_model(recipe)
        jobs.append(("untuned", model, p.preds("untuned")))
    first, *_ = all_seeds = recipe_seeds(recipe)
    for arm in ("labels", "vpd") if "labels" in recipe else ("vpd",):
        for s in all_seeds:
            out = p.preds(arm) if s == first else p.preds(arm, s)
            jobs.append((arm, p.arm_model(arm, s, s == first) / "final", out))
    return [Job(EVAL, {"model": m, "out": out, **common}) for _, m, out in jobs]


def _programs(recipe: Recipe, p: RunPaths) -> list[Job]:
    """The programs arm: the run's final program writer (the last writer round's, else the
    sample stage's LLM) and the execute stage's tools, one greedy program per test question
    (``programs.sample`` / ``programs.execute`` override them). With writer rounds and
    ``programs.rounds: true``, the writer of every earlier round (round 0: untuned) is
    scored the same way into its round's folder, for the report's per-round table."""
    o = _opts(recipe, "programs")
    per_round = bool(o.pop("rounds", False))
    sample = {**_opts(recipe, "sample"), **(o.pop("sample", None) or {})}
    execute = _tiny_tools(recipe, {**_opts(recipe, "execute"), **(o.pop("execute", None) or {})})
    rounds = writer_rounds(recipe)
    first = 0 if per_round and rounds else rounds
    return [
        Job(
            PROGRAMS,
            {
                "questions": p.test,
                "out": p.round_programs(r, rounds),
                "sample": writer_sample(recipe, p, sample, r),
                "execute": execute,
                **o,
            },
        )
        for r in range(first, rounds + 1)
    ]


def _untuned_model(recipe: Recipe) -> str:
    # `tiny`: the very model `vpd tune --init tiny` starts from (same recipes, cached). Only
    # its folder: the tune stage, which eval reads, builds it (configs are built before any
    # stage runs, and building the VLM there would cost minutes for a check).
    tune = recipe.get("tune") or {}
    init = str(tune.get("init", TINY))
    return resolve_vlm(init, tune.get("tiny_build"), tune.get("tiny_lm_layers"), build=False)


def _build_untuned(recipe: Recipe, p: RunPaths) -> None:
    """Make sure the untuned arm's tiny VLM exists (the tune stage built it, unless the
    cache was cleared since): a cache hit in a second."""
    o = recipe.get("eval") or {}
    tune = recipe.get("tune") or {}
    if o.get("untuned", True) is not False and not o.get("base_model"):
        init = str(tune.get("init", TINY))  # any other name is a model given as it is
        resolve_vlm(init, tune.get("tiny_build"), tune.get("tiny_lm_layers"))


def _tiny_tools(recipe: Recipe, opts: dict[str, Any]) -> dict[str, Any]:
    """Execute options whose ``tools.vqa: tiny`` is the tiny VLM this recipe's tune section
    describes (its ``tiny_build`` / ``tiny_lm_layers``), not the default build. Only the
    ones the recipe sets are added, so a recipe without them keeps its fingerprints."""
    tools = opts.get("tools") or {}
    tune = recipe.get("tune") or {}
    given = {k: tune[k] for k in TINY_OPTIONS if tune.get(k) is not None and k not in tools}
    if tools.get("vqa") != TINY or not given:
        return opts
    return {**opts, "tools": {**tools, **given}}


def _sdvp(recipe: Recipe, p: RunPaths) -> list[Job]:
    """SDVP after VPD, with the run's tuned VLM as the teacher (``teacher: tuned``, the
    default) and the tools' VLM as the student (``student``, default: the VLM the run tuned
    from), trained with the run's tune options (``sdvp.tune`` overrides them).

    Its programs are written by the run's final program writer (the last writer round's,
    else the recipe's sample LLM; ``sdvp.sample`` overrides the sample options): for the
    first ``eval_limit`` test questions (the held-out programs), and, with ``train_limit``,
    for that many train questions, executed with the recipe's tools, as the programs whose
    sub-tasks are distilled (without it: the final writer's executions)."""
    o = _opts(recipe, "sdvp")
    tune = dict(recipe.get("tune") or {})
    init = tune.pop("init", "tiny")
    sample = {**_opts(recipe, "sample"), **(o.pop("sample", None) or {})}
    sample = writer_sample(recipe, p, sample, writer_rounds(recipe))  # the final writer's
    sample.pop("limit", None)
    eval_limit, train_limit = o.pop("eval_limit", None), o.pop("train_limit", None)
    execute = _opts(recipe, "execute")
    tools = {
        k: v
        for k, v in (execute.get("tools") or {}).items()
        if k not in ("vqa", "vqa_ops", "vqa_view")  # the VLM mode is what sdvp sets
    }
    jobs: list[Job] = []
    _, executions, _ = p.final_programs(writer_rounds(recipe))
    if train_limit is not None:
        executions = p.sdvp / "train-executions.jsonl"
        train_samples = p.sdvp / "train-samples.jsonl"
        jobs += [
            Job(
                SAMPLE,
                {**sample, "questions": p.train, "out": train_samples, "limit": train_limit},
            ),
            Job(
                EXECUTE,
                {**execute, "samples": train_samples, "questions": p.train, "out": executions},
            ),
        ]
    jobs.append(
        Job(
            SAMPLE,
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
    jobs.append(Job(SDVP, fields))
    return jobs


# ----------------------------------------------------------------------------- progress


def _at_most(n: int, limit: Any) -> int:
    return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n


def _data_progress(r: RunFiles) -> str:
    return f"{r.count(r.paths.train)} train / {r.count(r.paths.test)} test questions"


def _sample_progress(r: RunFiles) -> str:
    # k from the recipe: the samples' meta does not hold it, and it may grow on resume.
    sample = r.recipe.get("sample") or {}
    k = int(sample.get("k", SampleConfig.model_fields["k"].default))
    nq = r.count(r.paths.train)
    expected = f"/{_at_most(nq, sample.get('limit')) * k}" if nq else ""
    return f"{r.count(r.paths.samples)}{expected} programs"


def _tune_progress(model: Path) -> str:
    final = model / "final"
    if final.exists():
        return "final model saved"
    ckpts = sorted(model.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[-1]))
    return f"last checkpoint: {ckpts[-1].name}" if ckpts else "no checkpoint yet"


def _eval_progress(r: RunFiles) -> str:
    p = r.paths
    n_eval = _at_most(r.count(p.test), (r.recipe.get("eval") or {}).get("limit"))
    done = [f"{w}: {r.count(p.vlm_preds(w))}/{n_eval}" for w in VLM_ARMS if p.vlm_preds(w).exists()]
    return ", ".join(done) or "no predictions yet"


def _writer_progress(r: RunFiles) -> str:
    rounds = writer_rounds(r.recipe)
    done = [
        n
        for n in range(1, rounds + 1)
        if (read_json(r.paths.writer_round(n) / "round.json") or {}).get("done")
    ]
    return f"{len(done)}/{rounds} rounds done"


def _sdvp_progress(r: RunFiles) -> str:
    out = r.paths.sdvp
    subs = r.count(subtasks_path(out))
    answered = [f"{d.name}: {r.count(teacher_path(out, d.name))}" for d in sorted(out.glob("*/"))]
    answered = [a for a in answered if not a.endswith(": 0")]
    if not subs:
        return "no sub-tasks yet"
    return f"{subs} sub-tasks; teacher answers " + (", ".join(answered) or "none yet")


# ----------------------------------------------------------------------------- registry


def _registry(*stages: Stage) -> dict[str, Stage]:
    return {s.name: s for s in stages}


STAGES: dict[str, Stage] = _registry(
    Stage(
        "data",
        (SYNTH, IMPORT),
        _data,
        outputs=lambda p: [p.data_dir],
        depends=(),
        progress=_data_progress,
    ),
    Stage(
        "sample",
        (SAMPLE,),
        _sample,
        outputs=lambda p: [p.samples],
        depends=("data",),
        progress=_sample_progress,
    ),
    Stage(
        "execute",
        (EXECUTE,),
        _execute,
        outputs=lambda p: [p.executions],
        depends=("data", "sample"),
        progress=lambda r: f"{r.count(r.paths.executions)}/{r.count(r.paths.samples)} programs",
    ),
    Stage(
        "verify",
        (VERIFY,),
        _verify,
        outputs=lambda p: [p.verified],
        depends=("data", "execute"),
        progress=lambda r: f"{r.count(r.paths.verified)}/{r.count(r.paths.samples)} samples",
    ),
    # Expert iteration (optional): the writer tuned on its kept programs, round by round.
    Stage(
        "writer",
        (ROUND,),
        _writer,
        # Round 0 has no writer of its own: its folder holds only the programs arm's
        # untuned-writer scores (the programs stage's output).
        outputs=lambda p: [r for r in sorted(p.root.glob("writer/round*")) if r.name != "round0"],
        depends=("data", "verify"),
        progress=_writer_progress,
        incremental=True,
    ),
    Stage(
        "rationalize",
        (RATIONALIZE,),
        _rationalize,
        outputs=lambda p: [p.sft],
        depends=("data", "verify", "writer"),
        progress=lambda r: f"{r.count(r.paths.sft)} sft records",
    ),
    Stage(
        "tune",
        (LABELS, TUNE),
        _tune,
        outputs=lambda p: [p.model, p.sft_val],
        depends=("data", "rationalize"),
        progress=lambda r: _tune_progress(r.paths.model),
    ),
    # The ablation arms hang off the chain: `labels` needs the data (and, for its step
    # budget, the vpd arm's tuning), `programs` only the test questions.
    Stage(
        "labels",
        (LABELS, TUNE),
        _labels,
        outputs=lambda p: [p.root / "labels"],
        depends=("data", "tune"),
        progress=lambda r: _tune_progress(r.paths.model_labels),
    ),
    Stage(
        "eval",
        (EVAL,),
        _eval,
        outputs=lambda p: [p.root / "eval"],
        depends=("data", "tune", "labels"),
        progress=_eval_progress,
        prepare=_build_untuned,
    ),
    Stage(
        "programs",
        (PROGRAMS,),
        _programs,
        # (with programs.rounds, each earlier writer's arm lies in its round's folder)
        outputs=lambda p: [p.programs, *sorted(p.root.glob("writer/round*/programs"))],
        depends=("data", "writer"),
        # The untuned writer's arm reads the test questions, not the writer's rounds: new
        # rounds leave it valid (15 minutes of sampling on 2 cores).
        keeps=lambda p, why: [] if "data" in why else [p.writer_round(0) / "programs"],
        progress=lambda r: f"{r.count(r.paths.programs / 'preds.jsonl')} scored test questions",
    ),
    # SDVP distils the tuned VLM (its teacher) on the run's executed programs.
    Stage(
        "sdvp",
        (SAMPLE, EXECUTE, SDVP),
        _sdvp,
        outputs=lambda p: [p.sdvp],
        depends=("data", "execute", "writer", "tune"),
        progress=_sdvp_progress,
    ),
)


def upstream(stage: str, present: set[str] | None = None) -> set[str]:
    """Every stage ``stage`` reads from, directly or not; with ``present`` (a recipe's
    stages), only through those: a stage a recipe leaves out makes no output, so what it
    would read is no input (without writer rounds, the programs arm does not read the
    sampled programs, only the sample options)."""
    seen: set[str] = set()
    todo = list(STAGES[stage].depends)
    while todo:
        s = todo.pop()
        if s not in seen and (present is None or s in present):
            seen.add(s)
            todo.extend(STAGES[s].depends)
    return seen
