"""End to end: a shrunken demo recipe through every stage, killed mid-stage and resumed.

Slow (a few minutes on 2 cores) but it is the one test that proves the pipeline works as a
whole, so CI runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    SMALL_TINY,
    check_marker_summaries,
    read_jsonl,
    run_vpd,
    status_rows,
    vpd_argv,
)

pytestmark = pytest.mark.slow

RECIPE = {
    "name": "tiny-e2e",
    "data": {"source": "synth", "n": 30, "seed": 3, "test_frac": 0.2},
    "sample": {
        "k": 2,
        "temperature": 0.5,
        "shots": 2,
        "max_tokens": 128,
        "limit": 8,
        "llm": {"backend": "local", "batch_size": 4},
    },
    "execute": {"backend": "synthetic", "timeout": 10, "workers": 2},
    "verify": {"policy": "all"},
    "rationalize": {"mode": "template", "add_labelled": True},
    "tune": {
        "init": "tiny",
        "tiny_build": SMALL_TINY.model_dump(mode="json"),  # the build's stages at toy sizes
        "max_steps": 3,
        "batch_size": 4,
        "max_length": 256,
        "lr": 1e-4,
    },
    "eval": {"batch_size": 6, "max_new_tokens": 6, "limit": 6},
}


def test_recipe_end_to_end_with_kill_and_resume(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    run = tmp_path / "run"
    cmd = vpd_argv("run", str(recipe), "--run-dir", str(run))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Start, wait until sampling has written something, then kill -9 the whole group.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    samples = run / "samples.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    data = samples.read_bytes()
    kept = data[: data.rfind(b"\n") + 1]  # the whole records (a torn tail is redone)
    partial = kept.count(b"\n")
    assert 2 <= partial < 16

    # `vpd status` on the killed run: data done, sampling partial with its count.
    st = run_vpd("status", str(run), timeout=120)
    assert st.returncode == 0, st.stderr
    rows = status_rows(st.stderr)
    assert rows["data"][0] == "done"
    assert rows["sample"] == ("partial", f"{partial}/16 programs")  # k=2 x limit 8
    assert rows["execute"] == ("not started", f"0/{partial} programs")

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]

    # Every stage finished, each unit of work exactly once, its summary of the declared type.
    for stage in ("data", "sample", "execute", "verify", "rationalize", "tune", "eval"):
        assert (run / "stages" / f"{stage}.json").exists(), stage
    assert len(check_marker_summaries(run)) == 7
    # Sampling resumed, not restarted: the killed run's samples stay first, byte for byte,
    # and the re-run wrote only the others.
    assert samples.read_bytes().startswith(kept)
    resumed = json.loads((run / "stages" / "sample.json").read_text())["summary"]
    assert (resumed["already_done"], resumed["written"]) == (partial, 16 - partial)
    sample_ids = [s["id"] for s in read_jsonl(samples)]
    assert len(sample_ids) == len(set(sample_ids)) == 8 * 2
    exec_ids = [e["id"] for e in read_jsonl(run / "executions.jsonl")]
    assert sorted(exec_ids) == sorted(sample_ids)
    verified = read_jsonl(run / "verified.jsonl")
    assert sorted(v["id"] for v in verified) == sorted(sample_ids)
    sft = read_jsonl(run / "sft.jsonl")
    assert len({r["id"] for r in sft}) == len(sft) > 0
    train_q = len(read_jsonl(run / "data" / "train.jsonl"))
    # add_labelled: every training question contributes an answer record.
    assert sum(r["task"] == "answer" for r in sft) == train_q
    assert (run / "model" / "final" / "config.json").exists()
    test_q = len(read_jsonl(run / "data" / "test.jsonl"))
    for which in ("untuned", "vpd"):
        preds = read_jsonl(run / "eval" / f"{which}.jsonl")
        assert len(preds) == min(6, test_q) > 0
        assert (run / "eval" / f"{which}.jsonl.report.json").exists()

    # The report agrees with the files.
    rep = json.loads((run / "report.json").read_text())
    f = rep["funnel"]
    assert f["samples"] == 16 and f["questions_train"] == train_q
    assert sum(f["executions"].values()) == 16
    assert f["kept"] == sum(v["kept"] for v in verified)
    assert set(rep["accuracy"]) == {"untuned", "vpd", "majority"}
    in_recipe = {"data", "sample", "execute", "verify", "rationalize", "tune", "eval"}
    assert {s["stage"] for s in rep["stages"] if s["state"] == "done"} == in_recipe
    md = (run / "report.md").read_text()
    assert "## Funnel" in md and "## Test accuracy" in md
    for png in ("funnel.png", "loss.png", "accuracy.png"):
        assert (run / png).stat().st_size > 1000, png

    # A re-run after completion does nothing and changes nothing.
    before = samples.read_bytes()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.count("(skipped)") == 7
    assert samples.read_bytes() == before

    st = run_vpd("status", str(run), timeout=120)
    assert st.returncode == 0, st.stderr
    rows = status_rows(st.stderr)
    assert {state for state, _ in rows.values()} == {"done"}
    for stage in ("labels", "programs", "sdvp"):  # not in the recipe, so not listed
        assert stage not in rows
    assert rows["data"][1] == f"{train_q} train / {test_q} test questions"
    assert rows["sample"][1] == rows["execute"][1] == "16/16 programs"
    assert rows["verify"][1] == "16/16 samples"
    assert rows["rationalize"][1] == f"{len(sft)} sft records"
    assert rows["tune"][1] == "final model saved"
    n = min(6, test_q)
    assert rows["eval"][1] == f"untuned: {n}/{n}, vpd: {n}/{n}"
