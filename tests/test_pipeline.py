"""`vpd run` / `vpd status`: recipe handling, stage markers, skip/resume, --force, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import invoke_vpd, read_jsonl, status_rows
from vpd.cli import app
from vpd.errors import VpdError
from vpd.pipeline import RunPaths, load_recipe, run_pipeline


def _recipe(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_load_recipe_overrides_parse_yaml_values(tmp_path: Path) -> None:
    r = _recipe(tmp_path, {"data": {"n": 10}, "sample": {"k": 5}})
    rec = load_recipe(r, ["sample.k=3", "sample.temperature=0.7", "data.seed=4", "eval.limit=9"])
    assert rec["sample"] == {"k": 3, "temperature": 0.7}
    assert rec["data"] == {"n": 10, "seed": 4}
    assert rec["eval"] == {"limit": 9}
    # Not valid YAML: kept as text, not a parser traceback.
    assert load_recipe(r, ["sample.prompt=[a"])["sample"]["prompt"] == "[a"


@pytest.mark.parametrize(
    ("body", "overrides", "message"),
    [
        ({"bogus": {}}, [], "unknown sections"),
        ({"data": {}}, ["k=3"], "stage.key=value"),
        ({"data": {}}, ["nostage.k=3"], "unknown stage"),
        ([1, 2], [], "mapping"),
    ],
)
def test_bad_recipes_are_clear_errors(tmp_path: Path, body, overrides, message) -> None:
    r = _recipe(tmp_path, body)
    with pytest.raises(VpdError, match=message):
        load_recipe(r, overrides)


def test_a_recipe_extends_another(tmp_path: Path) -> None:
    base = _recipe(tmp_path, {"data": {"n": 10, "seed": 1}, "tune": {"lr": 0.1}, "eval": {}})
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump({"extends": base.name, "data": {"n": 20}, "tune": None, "labels": {}})
    )
    rec = load_recipe(child, ["data.seed=4"])
    assert rec == {"data": {"n": 20, "seed": 4}, "eval": {}, "labels": {}}
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(VpdError, match="loops"):
        load_recipe(loop)
    missing = tmp_path / "m.yaml"
    missing.write_text("extends: nope.yaml\n")
    with pytest.raises(VpdError, match="not found"):
        load_recipe(missing)


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(VpdError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(VpdError, match="not valid YAML"):
        load_recipe(bad)


def test_unknown_stage_option_names_the_section(tmp_path: Path) -> None:
    r = _recipe(tmp_path, {"data": {"n": 10, "colour_depth": 3}})
    with pytest.raises(VpdError, match="recipe section 'data'"):
        run_pipeline(r, tmp_path / "run", report=False)


def test_data_stage_marker_skip_and_force(tmp_path: Path) -> None:
    r = _recipe(tmp_path, {"data": {"n": 20, "seed": 1, "progress": False}})
    run = tmp_path / "run"
    p = RunPaths(run)
    markers = run_pipeline(r, run, report=False)
    assert p.marker("data").exists()
    assert markers["data"]["summary"]
    lines = p.train.read_text().splitlines() + p.test.read_text().splitlines()
    assert len(lines) == 20

    # Finished stage: skipped without touching its outputs.
    mtime = p.train.stat().st_mtime_ns
    run_pipeline(r, run, report=False)
    assert p.train.stat().st_mtime_ns == mtime

    # Changed options: an error naming --force, then --force archives and re-runs.
    r2 = _recipe(tmp_path, {"data": {"n": 25, "seed": 1, "progress": False}})
    with pytest.raises(VpdError, match="--force"):
        run_pipeline(r2, run, report=False)
    run_pipeline(r2, run, report=False, force=True)
    lines = p.train.read_text().splitlines() + p.test.read_text().splitlines()
    assert len(lines) == 25
    archived = list((run / "archive").glob("*/data/train.jsonl"))
    assert len(archived) == 1
    assert len(archived[0].read_text().splitlines()) < 25


def test_copied_run_dir_keeps_its_finished_stages(tmp_path: Path) -> None:
    # `cp -r runs/a runs/b` then `--set ... --force` must re-run only what changed.
    r = _recipe(tmp_path, {"data": {"n": 10, "seed": 1, "progress": False}})
    run_pipeline(r, tmp_path / "a", report=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train = RunPaths(tmp_path / "b").train
    mtime = train.stat().st_mtime_ns
    run_pipeline(r, tmp_path / "b", report=False)
    assert train.stat().st_mtime_ns == mtime
    assert not (tmp_path / "b" / "archive").exists()


def test_a_stage_that_runs_again_makes_the_later_ones_run_again(tmp_path: Path) -> None:
    # `--force` on a stage, killed before it finished, then a plain rerun: the later
    # stages' markers describe the old output and must not be skipped.
    r = _recipe(tmp_path, {"data": {"n": 10, "seed": 1, "progress": False}, "verify": {}})
    run = tmp_path / "run"
    p = RunPaths(run)
    run_pipeline(r, run, only=["data"], report=False)
    q = json.loads(p.train.read_text().splitlines()[0])
    p.samples.write_text(json.dumps({"id": "s0", "qid": q["id"], "k": 0, "program": "x"}) + "\n")
    ex = {"id": "s0", "qid": q["id"], "status": "ok", "answer": q["answers"][0]}
    p.executions.write_text(json.dumps(ex) + "\n")
    run_pipeline(r, run, report=False)
    first = json.loads(p.marker("verify").read_text())["finished"]
    p.marker("data").unlink()  # data is running again (its marker goes first)
    run_pipeline(r, run, report=False)
    assert json.loads(p.marker("verify").read_text())["finished"] > first
    assert list((run / "archive").glob("*/verified.jsonl"))  # the old output kept aside


def test_status_and_report_on_partial_run(tmp_path: Path) -> None:
    r = _recipe(tmp_path, {"data": {"n": 10, "progress": False}})
    run = tmp_path / "run"
    run_pipeline(r, run)  # writes the report too
    rep = json.loads((run / "report.json").read_text())
    assert rep["funnel"]["questions_train"] + rep["funnel"]["questions_test"] == 10
    states = {s["stage"]: s["state"] for s in rep["stages"]}
    assert states == {"data": "done"}  # the only stage this recipe has
    assert (run / "report.md").read_text().startswith("# VPD run report")
    assert (run / "funnel.png").exists()

    rows = _status(run)
    train, test = len(read_jsonl(RunPaths(run).train)), len(read_jsonl(RunPaths(run).test))
    assert rows["data"] == ("done", f"{train} train / {test} test questions")
    assert train + test == 10
    assert list(rows) == ["data"]


def _status(run: Path) -> dict[str, tuple[str, str]]:
    return status_rows(invoke_vpd("status", str(run)).output)


def test_status_counts_a_partial_stage_then_finished_ones(tmp_path: Path) -> None:
    # The LLM server dies after 2 questions: sampling stops with 2 x k=2 programs of the
    # 3 x 2 its limit asks for, and no marker: a partial stage, as a kill leaves it.
    llm = {"backend": "openai", "concurrency": 1, "max_retries": 1, "backoff_base_s": 0.01}
    body = {
        "data": {"n": 10, "seed": 1, "test_frac": 0.2, "progress": False},
        "sample": {"k": 2, "limit": 3, "shots": 0, "progress": False, "llm": llm},
        "execute": {"workers": 1, "progress": False},
        "verify": {"policy": "all", "progress": False},
    }
    run = tmp_path / "run"
    with FakeOpenAIServer(script=["ok", "ok"], default="500") as srv:
        llm["base_urls"] = [srv.base_url]
        with pytest.raises(VpdError, match="LLM server unavailable"):
            run_pipeline(_recipe(tmp_path, body), run, report=False)
    p = RunPaths(run)
    train, test = len(read_jsonl(p.train)), len(read_jsonl(p.test))
    assert train + test == 10 and train >= 3
    rows = _status(run)
    assert rows["data"] == ("done", f"{train} train / {test} test questions")
    assert rows["sample"] == ("partial", "4/6 programs")
    assert rows["execute"] == ("not started", "0/4 programs")
    assert rows["verify"] == ("not started", "0/4 samples")
    assert list(rows) == ["data", "sample", "execute", "verify"]  # the recipe's stages

    # A working server: sampling resumes (the 2 missing programs), execute and verify run.
    with FakeOpenAIServer() as srv:
        llm["base_urls"] = [srv.base_url]
        run_pipeline(_recipe(tmp_path, body), run, report=False)
        assert srv.chat_hits == 1  # one question left: one request for its k=2
    rows = _status(run)
    assert rows["sample"] == ("done", "6/6 programs")
    assert rows["execute"] == ("done", "6/6 programs")
    assert rows["verify"] == ("done", "6/6 samples")


def test_status_rejects_non_run_dirs(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert res.exit_code != 0
    assert isinstance(res.exception, VpdError)


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))
)
def test_shipped_recipes_build_every_stage_config(recipe: str, tmp_path: Path) -> None:
    from vpd.stages import STAGES

    path = Path(__file__).parents[1] / "recipes" / recipe
    if recipe.startswith("tune-"):  # `vpd tune --recipe` files: the tune section alone
        from vpd.tune.config import load_tune_config

        cfg = load_tune_config(path, sft=tmp_path / "sft.jsonl", out=tmp_path / "model")
        assert cfg.lora_r > 0
        return
    rec = load_recipe(path)
    stages = [s for s in STAGES if s in rec]
    assert stages[0] == "data" and "eval" in stages
    # The labels arm takes its step budget from the finished vpd arm.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "summary.json").write_text('{"steps": 10}')
    for stage in stages:
        for job in STAGES[stage].jobs(rec, RunPaths(tmp_path)):
            job.config(stage)  # unknown or invalid options raise
