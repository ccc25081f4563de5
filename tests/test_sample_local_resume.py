"""`vpd sample` on the embedded SmolLM2 engine: killed with -9 and resumed, nothing lost,
nothing doubled, and the very programs an uninterrupted run writes (default dtype)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, read_jsonl, run_vpd, vpd_argv

pytestmark = pytest.mark.slow


def _questions(tmp: Path, n: int) -> Path:
    from vpd.data.synth import generate

    generate(tmp / "d", n=60, seed=5)
    rows = (tmp / "d" / "train.jsonl").read_text().splitlines()[:n]
    out = tmp / "d" / "q.jsonl"
    out.write_text("".join(r + "\n" for r in rows))
    return out


def _args(q: Path, out: Path) -> list[str]:
    return [
        "sample", str(q), "--out", str(out), "--k", "3", "--shots", "2", "--max-tokens", "48",
        "--batch-size", "6", "--no-progress",
    ]  # fmt: skip


def test_kill_9_mid_sampling_then_resume_gives_the_uninterrupted_programs(tmp_path: Path) -> None:
    q = _questions(tmp_path, 6)
    whole = tmp_path / "whole.jsonl"
    assert run_vpd(*_args(q, whole), timeout=1500).returncode == 0
    want = {r["id"]: r["program"] for r in read_jsonl(whole)}
    assert len(want) == 18

    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(vpd_argv(*_args(q, out)), cwd=REPO, env={**os.environ})
    deadline = time.time() + 1500
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "sampling ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(read_jsonl(out)) if out.stat().st_size else 0
    assert 5 <= before < 18

    assert run_vpd(*_args(q, out), timeout=1500).returncode == 0
    got = read_jsonl(out)
    assert sorted(r["id"] for r in got) == sorted(want)  # every (qid, k) exactly once
    # The resumed run decoded other rows side by side, yet each program is the same.
    assert {r["id"]: r["program"] for r in got} == want
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["config"]["llm"]["backend"] == "local"
