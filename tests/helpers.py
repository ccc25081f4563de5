"""Helpers shared by the test files: JSONL files in and out, and the `vpd` command line.

A plain module rather than conftest fixtures: these are functions of their arguments,
called from other helpers (``make_inputs``, ``_setup``...) and at import time, where a
fixture would have to be threaded through every caller; an import says where they live.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from click.testing import Result
from pydantic import BaseModel
from typer.testing import CliRunner

from vpd.cli import app
from vpd.stages import STAGES
from vpd.tune.align import AlignRecipe
from vpd.tune.model import TinyBuild
from vpd.tune.resampler import ResamplerRecipe
from vpd.tune.vision import VisionRecipe

REPO = Path(__file__).resolve().parent.parent
VPD = [sys.executable, "-m", "vpd.cli"]  # the CLI of this checkout (PYTHONPATH wins)

# The tiny VLM's three build stages at toy sizes (seconds, not the default's minutes): for
# tests of the paths around the model, where what it learned does not matter.
SMALL_TINY = TinyBuild(
    vision=VisionRecipe(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64,
                        layers=1, heads=2, steps=2, batch_size=4, probe_train_scenes=12,
                        probe_test_scenes=8),
    resampler=ResamplerRecipe(latents=4, heads=2, head_dim=16, kv_heads=1, scenes=16, steps=2,
                              batch_size=4, probe_scenes=4),
    align=AlignRecipe(captions=4, batch_size=2, probe_scenes=2),
)  # fmt: skip

M = TypeVar("M", bound=BaseModel)


def read_jsonl(path: Path, model: type[M] | None = None, missing_ok: bool = False) -> list[Any]:
    """The records of a JSONL file (blank lines skipped), as dicts or as ``model``.

    A missing file is an error unless ``missing_ok`` (then it holds no records), so a
    check over the records of a file that was never written cannot pass by accident.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if model is not None:
        return [model.model_validate_json(ln) for ln in lines]
    return [json.loads(ln) for ln in lines]


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any] | BaseModel]) -> Path:
    """Write ``rows`` (dicts or pydantic records) as JSONL, replacing the file; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        (r.model_dump_json() if isinstance(r, BaseModel) else json.dumps(r)) + "\n" for r in rows
    )
    path.write_text(text, encoding="utf-8")
    return path


def write_png(path: Path, size: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real (tiny) PNG at ``path``: stages check that an image decodes, not only that the
    file exists."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def check_summary(run: Any, summary: Any) -> None:
    """``summary`` has only the keys, of the types, that the stage function ``run`` declares
    as its return type (a TypedDict that forbids other keys): raises ValidationError if not."""
    from typing import get_type_hints

    from pydantic import TypeAdapter

    TypeAdapter(get_type_hints(run)["return"]).validate_python(summary)


def check_marker_summaries(run_dir: Path) -> list[str]:
    """Every stage marker's summary checked against its stage's run functions' declared
    summaries (a job's summary must fit one of them); returns the stages checked."""
    from pydantic import ValidationError

    from vpd.stages import STAGES

    checked = []
    for marker in sorted((Path(run_dir) / "stages").glob("*.json")):
        stage = marker.stem
        summary = json.loads(marker.read_text(encoding="utf-8"))["summary"]
        for one in summary if isinstance(summary, list) else [summary]:
            errors = []
            for runner in STAGES[stage].runners:
                try:
                    check_summary(runner.run, one)
                    break
                except ValidationError as e:
                    errors.append(str(e))
            else:
                raise AssertionError(f"{stage}: summary fits no declared type: {errors}")
        checked.append(stage)
    return checked


def vpd_argv(*args: str) -> list[str]:
    """The argv that runs ``vpd ARGS...`` (for Popen, kill tests)."""
    return [*VPD, *args]


def run_vpd(
    *args: str, timeout: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``vpd ARGS...`` from the repository root; text output captured, never raises.

    The console is 200 columns wide, so rich does not wrap the messages tests look for.
    """
    return subprocess.run(
        vpd_argv(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def read_rejects(out: Path) -> list[dict[str, Any]]:
    """The ``<out>.rejects.jsonl`` records of a stage output (none when it has no file)."""
    return read_jsonl(Path(f"{out}.rejects.jsonl"), missing_ok=True)


def status_rows(text: str) -> dict[str, tuple[str, str]]:
    """The table `vpd status` prints, as stage -> (state, progress): a row per stage of the
    run's recipe, in pipeline order."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)]
        if len(cells) == 6 and cells[1] in STAGES:
            rows[cells[1]] = (cells[2], cells[3])
    assert rows and list(rows) == [s for s in STAGES if s in rows], text
    return rows


def main_vpd(*args: str) -> tuple[int, str]:
    """``vpd ARGS...`` through the console-script entry (``vpd.cli.main``, which turns every
    user error into one line and exit code 2), in this process: (exit code, stderr)."""
    import contextlib
    import io

    from vpd.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def invoke_vpd(*args: str, ok: bool = True) -> Result:
    """``vpd ARGS...`` in this process (typer's CliRunner), on a 200-column console;
    with ``ok`` the command must succeed. Faster than :func:`run_vpd`, which checks what
    only a real process shows (exit code 2 for errors, stdout/stderr apart)."""
    res = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    if ok:
        assert res.exit_code == 0, res.output
    return res
