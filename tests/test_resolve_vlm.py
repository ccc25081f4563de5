"""`tiny` names one VLM everywhere: the one the run's tune options describe (no build here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vpd.errors import VpdError
from vpd.execute import runner
from vpd.runpaths import RunPaths
from vpd.stages import STAGES
from vpd.tune.model import TinyBuild, resolve_vlm

TOY = {"resampler": {"steps": 3}}  # any build other than the default


def test_tiny_is_the_build_the_options_describe() -> None:
    assert resolve_vlm("some/model") == "some/model"  # other names pass through
    assert resolve_vlm("tiny", build=False) == str(TinyBuild().path())
    toy = TinyBuild.model_validate(TOY)
    assert resolve_vlm("tiny", TOY, 2, build=False) == str(toy.path(2))
    assert resolve_vlm("tiny", toy, 2, build=False) == str(toy.path(2))
    assert toy.path(2) != TinyBuild().path(2)
    with pytest.raises(VpdError, match="tiny_build.resampler"):
        resolve_vlm("tiny", {"resampler": {"nope": 1}}, build=False)
    with pytest.raises(VpdError, match="tiny_lm_layers"):
        resolve_vlm("tiny", None, "2", build=False)  # type: ignore[arg-type]


def test_tools_vqa_tiny_takes_the_build_options(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []

    def fake(name: str, build: Any = None, layers: Any = None, **kw: Any) -> str:
        asked.append((name, build, layers))
        return "/models/tiny"

    monkeypatch.setattr(runner, "resolve_vlm", fake)
    opts = runner.resolve_tool_options({"vqa": "tiny", "tiny_build": TOY, "tiny_lm_layers": 1})
    assert opts == {"vqa": "/models/tiny"} and asked == [("tiny", TOY, 1)]
    # Without vqa: tiny they name nothing, and never reach the backend.
    assert runner.resolve_tool_options({"vqa": "/m", "tiny_build": TOY}) == {"vqa": "/m"}


def _tools(recipe: dict[str, Any], stage: str, tmp_path: Path) -> dict[str, Any]:
    (job,) = STAGES[stage].jobs(recipe, RunPaths(tmp_path))
    fields = job.fields
    return (fields["execute"] if stage == "programs" else fields).get("tools") or {}


def test_the_pipeline_gives_the_tools_its_tune_build(tmp_path: Path) -> None:
    tune = {"tiny_build": TOY, "tiny_lm_layers": 2}
    recipe = {"execute": {"tools": {"vqa": "tiny"}}, "tune": tune, "programs": {}}
    for stage in ("execute", "programs"):
        assert _tools(recipe, stage, tmp_path) == {"vqa": "tiny", **tune}
    # A recipe without those tune options keeps its execute options as they were.
    plain = {"execute": {"tools": {"vqa": "tiny"}}, "tune": {}, "programs": {}}
    assert _tools(plain, "execute", tmp_path) == {"vqa": "tiny"}
    other = {"execute": {"tools": {"vqa": "/m"}}, "tune": tune}
    assert _tools(other, "execute", tmp_path) == {"vqa": "/m"}
