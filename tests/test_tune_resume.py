"""A `vpd tune` killed with SIGKILL mid-run resumes and ends on the uninterrupted loss curve."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_tune import write_sft
from vpd.tune.tiny import build_tiny_family

pytestmark = pytest.mark.slow


def _cmd(sft: Path, out: Path, init: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vpd.cli",
        "tune",
        str(sft),
        "--out",
        str(out),
        "--init",
        str(init),
        "--max-steps",
        "12",
        "--save-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "2e-3",
        "--no-progress",
    ]


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows]


def test_kill_9_then_rerun_matches_uninterrupted_run(tmp_path):
    init = build_tiny_family("llava", tmp_path / "init")
    sft = write_sft(tmp_path / "data", n=8)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(sft, ref, init), check=True, capture_output=True, timeout=170)

    proc = subprocess.Popen(
        _cmd(sft, killed, init), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 150
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()

    subprocess.run(_cmd(sft, killed, init), check=True, capture_output=True, timeout=170)
    summary = json.loads((killed / "summary.json").read_text())
    assert 4 <= summary["resumed_from_step"] < 12 and summary["steps"] == 12
    a, b = _losses(ref), _losses(killed)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert abs(la - lb) < 1e-3 * max(1.0, abs(la))
