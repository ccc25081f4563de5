"""`vpd execute` on the command line: flags, one-line errors, help."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_vpd


def test_help_has_example() -> None:
    r = run_vpd("execute", "--help")
    assert r.returncode == 0
    assert "Example:" in r.stdout and "--timeout" in r.stdout and "--shard" in r.stdout


def test_missing_samples_is_one_line_error(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "q0", "image": "a.png", "question": "?"}) + "\n")
    r = run_vpd(
        "execute",
        str(tmp_path / "nope.jsonl"),
        "--questions",
        str(q),
        "--out",
        str(tmp_path / "e.jsonl"),
    )
    assert r.returncode == 2
    assert "samples file not found" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_shard_is_one_line_error(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "q0", "image": "a.png", "question": "?"}) + "\n")
    s = tmp_path / "s.jsonl"
    s.write_text(json.dumps({"id": "q0#0", "qid": "q0", "k": 0, "program": "x"}) + "\n")
    r = run_vpd(
        "execute",
        str(s),
        "--questions",
        str(q),
        "--out",
        str(tmp_path / "e.jsonl"),
        "--shard",
        "3/2",
    )
    assert r.returncode == 2 and "--shard" in r.stderr and "Traceback" not in r.stderr


def test_bad_tool_options_are_one_line_errors(tmp_path: Path) -> None:
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "q0", "image": "a.png", "question": "?"}) + "\n")
    s = tmp_path / "s.jsonl"
    s.write_text(json.dumps({"id": "q0#0", "qid": "q0", "k": 0, "program": "x"}) + "\n")
    base = ["execute", str(s), "--questions", str(q), "--out", str(tmp_path / "e.jsonl")]
    r = run_vpd(*base, "--tool-opt", "device")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr
    r = run_vpd(*base, "--backend", "hf", "--tool-opt", "colour=red")
    assert r.returncode == 2 and "bad options for tool backend 'hf'" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_vpd(*base, "--backend", "hf", "--tool-opt", "detect_threshold=7")
    assert r.returncode == 2 and "detect_threshold must be in [0, 1]" in r.stderr
    r = run_vpd(*base, "--backend", "nope")
    assert r.returncode == 2 and "unknown tool backend" in r.stderr
