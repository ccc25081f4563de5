"""recipes/scale/*: the scripts parse (`bash -n`, shellcheck where installed), every `vpd`
command they run or show in a comment exists and accepts every flag it passes (and its
--help shows them), and the checks the scripts make before any work hold."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tests.helpers import REPO, invoke_vpd, read_jsonl, write_jsonl
from vpd.cli import app
from vpd.records import Execution, Sample

SCALE = REPO / "recipes" / "scale"
SCRIPTS = sorted(p for p in SCALE.iterdir() if p.suffix in (".sh", ".sbatch"))
# The commands each file runs (or documents): a file that stops calling one fails here.
EXPECTED = {
    "hosts.sh": {"sample", "execute", "merge"},
    "sample-execute-array.sbatch": {"sample", "execute", "merge", "run", "serve"},
    "hostfile.example": {"tune"},
}
# `vpd CMD`, `vpd.cli CMD`, and `"$VPD" CMD` (the scripts run the command the user chose).
CALL = re.compile(r"(?:(?<![\w-])vpd(?:\.cli)?|\$\{?VPD\}?\"?)\s+([a-z][a-z-]*)")
END = re.compile(r"&&|\|\||[;|&`]")


def vpd_calls(text: str) -> list[tuple[str, list[str]]]:
    """Each `vpd COMMAND ...` (also `-m vpd.cli COMMAND`) with the --flags it passes, from
    the code and from the comments (which show the commands to run by hand)."""
    lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")  # continuation lines are one command
    calls = []
    for line in joined.splitlines():
        for m in CALL.finditer(line):
            rest = END.split(line[m.end() :], maxsplit=1)[0]
            flags = [t.split("=")[0] for t in rest.replace('"', " ").split() if t[:2] == "--"]
            calls.append((m.group(1), flags))
    return calls


def test_the_scale_recipes_are_all_here() -> None:
    assert sorted(p.name for p in SCALE.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="no shellcheck (.ci/run installs it)"
)
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_vpd_flag_exists(name: str) -> None:
    calls = vpd_calls((SCALE / name).read_text())
    assert {cmd for cmd, _ in calls} == EXPECTED[name]
    commands = typer.main.get_command(app).commands  # what parses the command line
    for cmd, flags in calls:
        assert cmd in commands, f"{name}: no `vpd {cmd}`"
        accepted = {o for p in commands[cmd].params for o in (*p.opts, *p.secondary_opts)}
        missing = [f for f in flags if f not in accepted]
        assert not missing, f"{name}: `vpd {cmd}` has no {missing}"
        # ... and `vpd CMD --help` shows them (the help is rendered from the same options).
        res = invoke_vpd(cmd, "--help")
        assert all(f in res.output for f in flags), res.output


def test_the_flag_reader_reads_continued_and_chained_commands() -> None:
    text = (
        "# run by hand:\n#   vpd merge --out a.jsonl b.jsonl\n"
        'ssh h "cd x && .venv/bin/vpd sample q.jsonl \\\n'
        '    --out s.jsonl --k 5 && .venv/bin/vpd execute s.jsonl --workers=2" &\n'
        "python -m vpd.cli tune sft.jsonl --init m; vpd-shard --bogus\n"
        'printf "%q " "$VPD" merge --out "$RUN/s.jsonl" "${SHARDS[@]}"\n'
    )
    assert vpd_calls(text) == [
        ("merge", ["--out"]),
        ("sample", ["--out", "--k"]),
        ("execute", ["--workers"]),
        ("tune", ["--init"]),
        ("merge", ["--out"]),
    ]


# ------------------------------------------------- the scripts' own checks, without a cluster
# (tests/test_slurm.py and tests/test_hosts.py run them for real on Slurm and over ssh)


def script(name: str, run: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run recipes/scale/NAME RUN ARGS... with ``env`` added (and no outer SLURM_*), from
    RUN's folder. VPD=false: a script that got past its checks fails with 1, not 2."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", str(SCALE / name), str(run), *args],
        env={**base, "VPD": "false", "BASE_URL": "http://127.0.0.1:9/v1", **env},
        cwd=run.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_array_header_asks_for_no_gres() -> None:
    """A --gres in the header fails the submission on every node without GRES."""
    text = (SCALE / "sample-execute-array.sbatch").read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert header and not [ln for ln in header if "--gres" in ln]


def test_the_documented_merge_takes_the_shards_and_nothing_beside_them(tmp_path: Path) -> None:
    """The header's `vpd merge` commands, run as shown, beside each shard's rejects file
    (whose reject records carry ids) and meta: the merged file holds the samples only."""
    shards = tmp_path / "runs" / "big" / "shards"
    expected = []
    for i in range(16):
        sample = Sample(id=f"q{i}#0", qid=f"q{i}", k=0, program="return 1")
        write_jsonl(shards / f"samples.{i}.jsonl", [sample])
        execution = Execution(id=sample.id, qid=sample.qid, status="ok", answer="1")
        write_jsonl(shards / f"executions.{i}.jsonl", [execution])
        for name in ("samples", "executions"):
            reject = {"line": 3, "id": f"bad{i}", "reason": "no image", "raw": "{}"}
            write_jsonl(shards / f"{name}.{i}.jsonl.rejects.jsonl", [reject])
        expected.append(sample.id)
    text = (SCALE / "sample-execute-array.sbatch").read_text()
    merges = [ln.lstrip("# ") for ln in text.splitlines() if ln.startswith("#   vpd merge")]
    assert len(merges) == 2
    bin_dir = str(Path(sys.executable).parent)  # this checkout's vpd first on PATH
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for cmd in merges:
        r = subprocess.run(
            ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
    for name in ("samples", "executions"):
        merged = read_jsonl(tmp_path / "runs" / "big" / f"{name}.jsonl")
        assert sorted(r["id"] for r in merged) == sorted(expected)


def test_a_task_resubmitted_alone_must_be_told_the_shard_count(tmp_path: Path) -> None:
    """`sbatch --array=2` is a one-task array (SLURM_ARRAY_TASK_COUNT=1): task 2 cannot be
    shard 2/1, and task 0 would take all the questions as 0/1; both stop, saying N."""
    shards = tmp_path / "run" / "shards"
    shards.mkdir(parents=True)
    (shards / "N").write_text("4\n")  # what the array's first task recorded
    r = script(
        "sample-execute-array.sbatch",
        shards.parent,
        SLURM_ARRAY_TASK_ID="2",
        SLURM_ARRAY_TASK_COUNT="1",
    )
    assert r.returncode == 2 and "sbatch --array=2 --export=ALL,N=4" in r.stderr, r.stderr
    r = script(
        "sample-execute-array.sbatch",
        shards.parent,
        SLURM_ARRAY_TASK_ID="0",
        SLURM_ARRAY_TASK_COUNT="1",
    )
    assert r.returncode == 2 and "sbatch --array=0 --export=ALL,N=4" in r.stderr, r.stderr
    assert sorted(p.name for p in shards.iterdir()) == ["N"]  # nothing written
    # Told N, the task passes the checks (and runs VPD, here `false`).
    r = script(
        "sample-execute-array.sbatch",
        shards.parent,
        SLURM_ARRAY_TASK_ID="2",
        SLURM_ARRAY_TASK_COUNT="1",
        N="4",
    )
    assert r.returncode == 1, r.stderr


def test_hosts_refuse_another_number_of_hosts_before_any_work(tmp_path: Path) -> None:
    """Shards are a hash modulo N: two hosts on a run sharded for three would redo and mix
    questions up, so the script stops before it connects to any host."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "train.jsonl").write_text("")
    (run / "shards").mkdir()
    (run / "shards" / "N").write_text("3\n")
    r = script("hosts.sh", run, "h0", "h1", SSH="false")
    assert r.returncode == 2 and "holds 3 shards, 2 hosts were given" in r.stderr, r.stderr
    assert sorted(p.name for p in (run / "shards").iterdir()) == ["N"]
    # Three hosts pass the check; SSH=false fails each, and the script names them all.
    r = script("hosts.sh", run, "h0", "h1", "h2", SSH="false")
    assert r.returncode == 1 and "failed on h0 h1 h2; nothing merged" in r.stderr, r.stderr
    assert not (run / "samples.jsonl").exists()
