"""`vpd sdvp` as steps (vpd/sdvp/run.py): `until` names a step, and only the steps up to it
run, as `vpd run --only` picks stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from tests.helpers import read_jsonl, write_jsonl
from vpd.sdvp import SdvpConfig, run_sdvp
from vpd.sdvp import run as sdvp_run
from vpd.sdvp.config import Until
from vpd.sdvp.run import STEPS, Step


def test_until_names_the_steps_in_order() -> None:
    assert tuple(s.name for s in STEPS) == get_args(Until)
    assert SdvpConfig.model_fields["until"].default == STEPS[-1].name


def _executions(synth_dir: Path, tmp_path: Path) -> Path:
    q = read_jsonl(synth_dir / "train.jsonl")[0]
    call = {"name": "simple_query", "args": {"question": "What?", "patch": [0, 0, 1, 1]}}
    return write_jsonl(
        tmp_path / "ex.jsonl",
        [{"id": f"{q['id']}#0", "qid": q["id"], "status": "ok", "trace": [call]}],
    )


def test_until_runs_the_steps_up_to_it(
    monkeypatch: pytest.MonkeyPatch, synth_dir: Path, tmp_path: Path
) -> None:
    ran: list[str] = []

    def says(name: str) -> Step:
        return Step(name, lambda run: ran.append(name))

    # Every step after collect only says it ran.
    monkeypatch.setattr(sdvp_run, "STEPS", (STEPS[0], *(says(s.name) for s in STEPS[1:])))

    def cfg(until: str) -> SdvpConfig:
        return SdvpConfig(
            executions=_executions(synth_dir, tmp_path),
            questions=synth_dir / "train.jsonl",
            teacher="no-such-model",  # never loaded: no teacher step runs for real
            out=tmp_path / "out",
            until=until,
            progress=False,
        )

    rep = run_sdvp(cfg("collect"))
    assert ran == [] and rep["subtasks"]["distilled"] == 1
    assert rep["variants"] == {
        "pointer": {
            "view": "pointer",
            "rewrite": True,
            "adapter": "region drawn as a box on the image; question names the object in the box",
        }
    }
    assert json.loads((tmp_path / "out" / "sdvp.json").read_text())["subtasks"] == rep["subtasks"]
    run_sdvp(cfg("sft"))
    assert ran == ["teacher", "sft"]
    ran.clear()
    run_sdvp(cfg("eval"))
    assert ran == ["teacher", "sft", "tune", "eval"]
