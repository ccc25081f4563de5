"""What the Slurm and ssh tests of recipes/scale/ share: a tiny run directory, the settings
the scripts read, the one-process reference, and the check that sharded runs joined by
`vpd merge` hold what one process writes: the same ids, none lost, none twice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, read_jsonl, run_vpd
from vpd.store import parse_shard, read_meta

SCALE = REPO / "recipes" / "scale"
QUESTIONS = 20  # few: every shard still gets several, and a whole run takes seconds
K = 2
# A question the sample and execute stages reject (no image): each shard writes a
# *.rejects.jsonl holding its id, which a merge pattern like samples.*.jsonl would take.
BAD_LINE = '{"id": "no-image", "question": "How many circles?"}\n'
# Where CI installed the daemons, a test that cannot start them fails instead of skipping.
REQUIRE = "VPD_REQUIRE_CLUSTER"


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail with it where $VPD_REQUIRE_CLUSTER is set (CI)."""
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} (${REQUIRE} is set: the daemons must start here)")
    pytest.skip(reason)


def make_data(root: Path) -> Path:
    """``vpd data synth`` questions (train only) plus one bad line; returns the data folder."""
    data = root / "data"
    r = run_vpd(
        "data",
        "synth",
        "--out",
        str(data),
        "--n",
        str(QUESTIONS),
        "--test-frac",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    with open(data / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(BAD_LINE)
    return data


def new_run(data: Path, root: Path) -> Path:
    """A fresh run directory holding a copy of ``data`` (RUN/data/train.jsonl)."""
    run = root / "run"
    shutil.copytree(data, run / "data")
    return run


def settings(base_url: str, **more: str) -> dict[str, str]:
    """The environment the scripts run in: this checkout's venv first on PATH, the scripts'
    settings, and no SLURM_* of an outer job (a test run inside Slurm would hand its own
    task id to ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{venv_bin}:{env.get('PATH', '')}",
        BASE_URL=base_url,
        K=str(K),
        WORKERS="1",
        COLUMNS="200",
        **more,
    )
    return env


def reference_samples(data: Path, base_url: str, out: Path) -> list[dict[str, Any]]:
    """``vpd sample`` in one process, with the settings the scripts pass by default."""
    r = run_vpd(
        "sample",
        str(data / "train.jsonl"),
        "--out",
        str(out),
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--k",
        str(K),
        "--temperature",
        "0.5",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return read_jsonl(out)


# Settings a test passes to check they reach `vpd sample` and `vpd execute` (the fake server
# ignores max_tokens and serves fake-model: the records stay those of the reference run).
PASSED = {
    "MODEL": "fake-model",
    "SAMPLE_ARGS": "--max-tokens 200",
    "EXECUTE_ARGS": "--timeout 20",
}


def check_passed(shards: Path, n: int) -> None:
    """Each shard's outputs were written with the :data:`PASSED` settings and its shard."""
    for i in range(n):
        sample = read_meta(shards / f"samples.{i}.jsonl")
        execute = read_meta(shards / f"executions.{i}.jsonl")
        assert sample and execute, f"shard {i} has no meta"
        assert sample["llm"]["model"] == "fake-model" and sample["max_tokens"] == 200
        assert execute["timeout"] == 20
        assert sample["shard"] == execute["shard"] == f"{i}/{n}"


def shard_of(qid: str, n: int) -> int:
    """The shard (of ``n``) that owns question ``qid``: the scripts' --shard i/n."""
    return next(i for i in range(n) if parse_shard(f"{i}/{n}").owns(qid))  # type: ignore[union-attr]


def merge_as_documented(run: Path, n: int, env: dict[str, str]) -> None:
    """The two `vpd merge` commands of the scripts' headers, run by bash as a user would."""
    for name in ("samples", "executions"):
        cmd = f"vpd merge --out {run}/{name}.jsonl {run}/shards/{name}.{{0..{n - 1}}}.jsonl"
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


def check_merged(run: Path, reference: list[dict[str, Any]], same_text: bool = True) -> None:
    """RUN/samples.jsonl and RUN/executions.jsonl against one process.

    Samples: the reference's ids, each once (nothing lost, nothing twice, no reject record);
    with ``same_text`` the very records, but for the time each request took (a question
    resumed with fewer missing samples asks the server another way: only its ids compare).
    Executions: those `vpd execute` writes in one process from the merged samples.
    """
    samples = read_jsonl(run / "samples.jsonl")
    got = [s["id"] for s in samples]
    assert len(got) == len(set(got)), "a sample merged twice"
    assert sorted(got) == sorted(r["id"] for r in reference)  # so no reject record either
    if same_text:
        timeless = {r["id"]: {**r, "latency_s": 0} for r in reference}
        assert {s["id"]: {**s, "latency_s": 0} for s in samples} == timeless

    execs = read_jsonl(run / "executions.jsonl")
    assert sorted(e["id"] for e in execs) == sorted(got)
    one = run / "one-process-executions.jsonl"
    r = run_vpd(
        "execute",
        str(run / "samples.jsonl"),
        "--questions",
        str(run / "data" / "train.jsonl"),
        "--out",
        str(one),
        "--workers",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr

    def outcome(rows: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
        return {e["id"]: (e["status"], e["answer"]) for e in rows}

    assert outcome(execs) == outcome(read_jsonl(one))
