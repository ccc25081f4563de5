"""The stage registry (vpd/stages.py): one entry is all a stage needs, and the markers of
existing runs keep their fingerprints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from vpd.errors import VpdError
from vpd.pipeline import run_pipeline
from vpd.report import progress_counts, stage_table
from vpd.runpaths import RunPaths
from vpd.stages import STAGES, Job, RunFiles, Runner, Stage, upstream

# ----------------------------------------------------------------------------- a toy stage


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path
    n: int = Field(3, ge=1)


RUNS: list[int] = []


def run_toy(cfg: ToyConfig) -> dict[str, Any]:
    RUNS.append(cfg.n)
    cfg.out.write_text("".join(json.dumps({"id": f"t{i}"}) + "\n" for i in range(cfg.n)))
    return {"written": cfg.n}


TOY = Runner(ToyConfig, run_toy, "tests.test_stages")


def _toy_jobs(recipe: dict[str, Any], p: RunPaths) -> list[Job]:
    return [Job(TOY, {"out": p.root / "toy.jsonl", **(recipe.get("toy") or {})})]


def _toy_progress(r: RunFiles) -> str:
    return f"{r.count(r.paths.root / 'toy.jsonl')} toys"


TOY_STAGE = Stage(
    "toy",
    (TOY,),
    _toy_jobs,
    outputs=lambda p: [p.root / "toy.jsonl"],
    depends=(),
    progress=_toy_progress,
)


def test_one_registry_entry_is_a_whole_stage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Registered, a stage is in recipes, runs and resumes under `vpd run`, and has its row
    and progress line in `vpd status`; nothing else names it."""
    monkeypatch.setitem(STAGES, "toy", TOY_STAGE)
    RUNS.clear()
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({"toy": {"n": 3}}))
    run = tmp_path / "run"
    p = RunPaths(run)

    markers = run_pipeline(recipe, run, report=False)
    assert RUNS == [3] and markers["toy"]["summary"] == {"written": 3}
    assert json.loads(p.marker("toy").read_text())["summary"] == {"written": 3}
    assert [(r["stage"], r["state"]) for r in stage_table(p)] == [("toy", "done")]
    assert progress_counts(p)["toy"] == "3 toys"

    run_pipeline(recipe, run, report=False)  # finished: skipped
    assert RUNS == [3]
    recipe.write_text(yaml.safe_dump({"toy": {"n": 4}}))
    with pytest.raises(VpdError, match="run with other options"):
        run_pipeline(recipe, run, report=False)
    run_pipeline(recipe, run, report=False, force=True)
    assert RUNS == [3, 4] and progress_counts(p)["toy"] == "4 toys"
    (archived,) = (run / "archive").glob("*/toy.jsonl")  # the old output set aside
    assert archived.read_text().count("\n") == 3

    recipe.write_text(yaml.safe_dump({"toy": {"m": 1}}))
    with pytest.raises(VpdError, match=r"recipe section 'toy': unknown option\(s\) \['m'\]"):
        run_pipeline(recipe, run, report=False)


def test_a_stage_runs_only_the_runners_it_declares(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sneaky = Stage(
        "toy",
        (STAGES["data"].runners[0],),  # declares synth, builds a toy job
        _toy_jobs,
        outputs=TOY_STAGE.outputs,
        depends=(),
        progress=_toy_progress,
    )
    with pytest.raises(VpdError, match="does not declare"):
        sneaky.jobs({"toy": {}}, RunPaths(tmp_path))


class LateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path
    tag: int = 0


LATE_RUNS: list[str] = []


def run_late(cfg: LateConfig) -> dict[str, Any]:
    if cfg.out.exists():  # resumable, as every stage's jobs are: a finished output is kept
        return {"skipped": True}
    LATE_RUNS.append(cfg.out.name)
    cfg.out.write_text(json.dumps({"id": cfg.out.stem, "tag": cfg.tag}) + "\n")
    return {"written": 1}


LATE = Runner(LateConfig, run_late, "tests.test_stages")


def test_outputs_a_stage_keeps_when_only_its_inputs_ran_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stage made stale by an upstream stage archives its outputs, except those its
    ``keeps`` names for that upstream (the programs arm's untuned writer, when only the
    writer's rounds ran); when its own options change too, everything goes."""
    late = Stage(
        "late",
        (LATE,),
        lambda r, p: [
            Job(LATE, {"out": p.root / f"late-{x}.jsonl", **(r.get("late") or {})}) for x in "ab"
        ],
        outputs=lambda p: [p.root / "late-a.jsonl", p.root / "late-b.jsonl"],
        depends=("toy",),
        progress=lambda r: "",
        keeps=lambda p, why: [p.root / "late-b.jsonl"] if why == {"toy"} else [],
    )
    monkeypatch.setitem(STAGES, "toy", TOY_STAGE)
    monkeypatch.setitem(STAGES, "late", late)
    LATE_RUNS.clear()
    recipe = tmp_path / "r.yaml"
    run = tmp_path / "run"
    recipe.write_text(yaml.safe_dump({"toy": {"n": 3}, "late": {}}))
    run_pipeline(recipe, run, report=False)
    assert LATE_RUNS == ["late-a.jsonl", "late-b.jsonl"]

    recipe.write_text(yaml.safe_dump({"toy": {"n": 4}, "late": {}}))
    run_pipeline(recipe, run, report=False, force=True)
    assert LATE_RUNS[2:] == ["late-a.jsonl"]  # b was kept, and its job found it done
    assert [f.name for f in (run / "archive").glob("*/late-*")] == ["late-a.jsonl"]
    assert (run / "late-b.jsonl").exists()

    recipe.write_text(yaml.safe_dump({"toy": {"n": 5}, "late": {"tag": 1}}))
    run_pipeline(recipe, run, report=False, force=True)
    assert LATE_RUNS[3:] == ["late-a.jsonl", "late-b.jsonl"]
    assert json.loads((run / "late-b.jsonl").read_text())["tag"] == 1


def test_new_writer_rounds_keep_the_untuned_writers_programs_arm(tmp_path: Path) -> None:
    """The writer stage's outputs are its rounds (round 0 holds only the programs arm of the
    untuned writer), and the programs stage keeps that arm unless the data changed."""
    p = RunPaths(tmp_path)
    for r in (0, 1, 2):
        (p.writer_round(r) / "programs").mkdir(parents=True)
    assert STAGES["writer"].outputs(p) == [p.writer_round(1), p.writer_round(2)]
    keeps = STAGES["programs"].keeps
    assert keeps is not None
    assert keeps(p, {"writer", "verify"}) == [p.writer_round(0) / "programs"]
    assert keeps(p, {"writer"})[0] in STAGES["programs"].outputs(p)  # the path _archive sees
    assert keeps(p, {"data", "writer"}) == []


def test_registry_is_in_run_order() -> None:
    """A stage reads only stages before it: `vpd run` walks the registry in order, and a
    stage that ran makes the ones after it that read it run again."""
    names = list(STAGES)
    assert names == [
        "data",
        "sample",
        "execute",
        "verify",
        "writer",
        "rationalize",
        "tune",
        "labels",
        "eval",
        "programs",
        "sdvp",
    ]
    for i, (name, stage) in enumerate(STAGES.items()):
        assert stage.name == name
        assert set(stage.depends) <= set(names[:i]), name
        assert {j.runner for j in stage.jobs({}, RunPaths(Path("/r")))} <= set(stage.runners)
    assert upstream("sdvp") == {
        "data", "sample", "execute", "rationalize", "verify", "writer", "tune"
    }  # fmt: skip


# ----------------------------------------------------------------------------- fingerprints

# Every stage's marker fingerprint for one recipe, as `vpd run` computed it before the stage
# registry existed: a change here makes every existing run directory report its finished
# stages as "run with other options".
PINNED_RECIPE: dict[str, Any] = {
    "seeds": [0, 1],
    "data": {"n": 40, "seed": 3, "val_frac": 0.1},
    "sample": {"k": 2, "limit": 10},
    "execute": {"workers": 2, "tools": {"vqa": "tiny"}},
    "verify": {"policy": "all"},
    "rationalize": {},
    "tune": {"max_steps": 3, "tiny_lm_layers": 2},
    "labels": {},
    "eval": {"base_model": "/models/base", "limit": 5},
    "programs": {"limit": 5, "execute": {"workers": 1}},
    "sdvp": {"train_limit": 4, "eval_limit": 3, "holdout_types": ["yesno"]},
}
PINNED = {
    "data": "d362a8569d1401ac",
    "sample": "28d97721262d1ed7",
    "execute": "b3c66d4f5b4bc528",
    "verify": "3e013ee8bb1fb802",
    "writer": "4f53cda18c2baa0c",  # no writer section: no rounds
    "rationalize": "270d0d8600b90cc4",
    "tune": "251ff8787ad64a1e",
    "labels": "0acd54015fb6e87e",
    "eval": "555726d91d1d0d93",
    "programs": "216f704413ac497b",
    "sdvp": "1cc6e08beb867241",
}


def test_marker_fingerprints_are_those_of_existing_runs(tmp_path: Path) -> None:
    from vpd.pipeline import stage_fingerprint

    p = RunPaths(tmp_path / "run")
    got = {
        name: stage_fingerprint(stage.jobs(PINNED_RECIPE, p), p.root)
        for name, stage in STAGES.items()
    }
    assert got == PINNED
