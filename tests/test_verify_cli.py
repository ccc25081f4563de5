"""`vpd verify` / `vpd rationalize` command lines: flags reach the stage; bad flags are errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.helpers import run_vpd, write_png
from tests.test_verify_stage import make_inputs
from vpd.cli import app


def test_verify_then_rationalize_cli(tmp_path: Path) -> None:
    p = make_inputs(tmp_path)
    for i in (1, 2, 3, 4):  # rationalize checks that each image decodes
        write_png(p["questions"].parent / f"i{i}.png")
    runner = CliRunner()
    v = tmp_path / "v.jsonl"
    res = runner.invoke(
        app,
        ["verify", str(p["executions"]), "--samples", str(p["samples"]), "--questions",
         str(p["questions"]), "--out", str(v), "--policy", "shortest", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    kept = [r["id"] for r in map(json.loads, v.read_text().splitlines()) if r["kept"]]
    assert sorted(kept) == ["q1#2", "q2#2"]
    assert json.loads((tmp_path / "v.jsonl.funnel.json").read_text())["kept"] == 2
    sft = tmp_path / "sft.jsonl"
    res = runner.invoke(
        app,
        ["rationalize", str(v), "--questions", str(p["questions"]), "--out", str(sft),
         "--add-labelled", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ids = [json.loads(x)["id"] for x in sft.read_text().splitlines()]
    assert ids == ["q1/answer", "q1/rationale", "q2/answer", "q2/rationale", "q3/answer",
                   "q4/answer"]  # fmt: skip


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    p = make_inputs(tmp_path)
    for extra, needle in (
        (["--policy", "best"], "--policy: Input should be 'first'"),
        (["--metric", "bleu"], "--metric: Input should be 'auto'"),
        (["--shard", "3/2"], "--shard 3/2"),
    ):
        r = run_vpd("verify", str(p["executions"]), "--samples", str(p["samples"]),
                    "--questions", str(p["questions"]), "--out", str(tmp_path / "v.jsonl"),
                    *extra)  # fmt: skip
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    r = run_vpd("rationalize", str(tmp_path / "missing.jsonl"), "--questions",
                str(p["questions"]), "--out", str(tmp_path / "s.jsonl"))  # fmt: skip
    assert r.returncode == 2 and "not found" in r.stderr
