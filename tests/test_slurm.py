"""recipes/scale/sample-execute-array.sbatch on a real one-node Slurm: munged, slurmctld and
slurmd (Debian's slurm-wlm) started for this module on free ports, as root, against the
scripted OpenAI server; the shards joined by `vpd merge` are compared with one process.

Needs root and slurm-wlm (.ci/run installs it); elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import read_jsonl
from tests.scale_helpers import (
    PASSED,
    SCALE,
    K,
    check_merged,
    check_passed,
    ids,
    make_data,
    merge_as_documented,
    new_run,
    reference_samples,
    settings,
    shard_of,
    unavailable,
)
from vpd import net

pytestmark = pytest.mark.slow

SCRIPT = SCALE / "sample-execute-array.sbatch"
TASKS = 4
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


class Slurm:
    """A one-node cluster in ``root``: its daemons, and the client commands pointed at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.cpus = os.cpu_count() or 1
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (root / d).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = root / "munge.sock"
        self.conf = root / "slurm.conf"
        self.conf.write_text(
            f"""ClusterName=vpdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={net.free_port()}
SlurmdPort={net.free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=3600
NodeName=vpdnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=vpdnode Default=YES MaxTime=INFINITE State=UP
"""
        )  # no GRES on the node: a script asking for a GPU in its header is refused here
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._start(
            "munged",
            "-F",
            "-f",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        )
        end = time.monotonic() + 20  # slurmctld authenticates through munged from its start
        while not sock.exists() and time.monotonic() < end and self.procs[0].poll() is None:
            time.sleep(0.1)
        self._start("slurmctld", "-D", "-f", str(self.conf))
        self._start("slurmd", "-D", "-f", str(self.conf), "-N", "vpdnode")

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - open while it runs
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                [shutil.which(name) or name, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        )

    def run(
        self, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv,
            env={**(env or self.env), "SLURM_CONF": str(self.conf)},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def ready(self, timeout: float = 60) -> str | None:
        """None once the node takes jobs, else what went wrong (with the daemons' logs)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            r = self.run("sinfo", "-h", "-N", "-o", "%T")
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return None
            time.sleep(0.5)
        logs = "\n".join(
            f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-8:])
            for p in sorted(self.root.glob("*.out")) + sorted(self.root.glob("*.log"))
        )
        return f"the one-node Slurm did not come up (exited: {dead or 'none'}):\n{logs}"

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        return self.run("sbatch", *args, env=env, cwd=cwd)

    def tasks(self, job: str) -> dict[int, tuple[str, str]]:
        """Task id -> (state, exit code) for every task of array ``job``."""
        r = self.run("scontrol", "-o", "show", "job", job)
        assert r.returncode == 0, r.stderr
        out = {}
        for line in r.stdout.splitlines():
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            out[int(f["ArrayTaskId"])] = (f["JobState"], f["ExitCode"])
        return out

    def wait(self, job: str, timeout: float = 300) -> dict[int, tuple[str, str]]:
        """Poll until no task of ``job`` is pending or running: sbatch --wait polls at growing
        intervals (10 s for a 1 s array here), too slow where it is not what a test checks."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.run("squeue", "-h", "-j", job, "-o", "%i")
            if r.returncode == 0 and not r.stdout.strip():
                return self.tasks(job)
            time.sleep(0.3)
        raise AssertionError(f"array {job} still running after {timeout} s")

    def stop(self) -> None:
        self.run("scancel", "--user", "root")
        end = time.monotonic() + 20  # let slurmd end the cancelled tasks before it goes
        while time.monotonic() < end and self.run("squeue", "-h").stdout.strip():
            time.sleep(0.3)
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        unavailable(f"no {', '.join(missing)}: apt-get install slurm-wlm (.ci/run does)")
    if os.geteuid() != 0:
        unavailable("slurmd starts jobs only as root (CI runs as root)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        why = cluster.ready()
        if why:
            unavailable(why)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("scale-data"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with FakeOpenAIServer() as srv:
        return reference_samples(data, srv.base_url, tmp_path_factory.mktemp("ref") / "s.jsonl")


def logs(where: Path) -> str:
    """The tasks' logs (the header's --output=%x-%A_%a.log: in the submit directory)."""
    return "\n".join(f"--- {p.name}:\n{p.read_text()[-1500:]}" for p in sorted(where.glob("*.log")))


def submit(
    slurm: Slurm, where: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess:
    """``sbatch ARGS... SCRIPT run`` from ``where`` (not the checkout), one CPU a task: the
    header's example asks for more than a small node has, and the command line wins."""
    return slurm.sbatch(*args, "--cpus-per-task=1", str(SCRIPT), "run", env=env, cwd=where)


def run_array(
    slurm: Slurm, where: Path, env: dict[str, str], *args: str
) -> tuple[str, dict[int, tuple[str, str]]]:
    """Submit, wait for every task; the array's job id and its tasks' (state, exit code)."""
    r = submit(slurm, where, env, "--parsable", *args)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, slurm.wait(job)


def test_the_array_matches_one_process(
    slurm: Slurm, data: Path, reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Submitted from outside the checkout, on a node without GRES and with fewer CPUs than
    the header's example (the command line overrides it), against a server that fails now
    and then; one request in flight per task (CONCURRENCY=1)."""
    run = new_run(data, tmp_path)
    faults = ["500", "429:0", "503", "malformed", "nochoices"]
    with FakeOpenAIServer(script=faults, latency_s=0.05) as srv:
        env = settings(srv.base_url, CONCURRENCY="1", **PASSED)
        _, states = run_array(slurm, tmp_path, env, f"--array=0-{TASKS - 1}")
        assert set(states.values()) == {("COMPLETED", "0:0")}, logs(tmp_path)
        # Each fault cost one more request, and no question was asked twice.
        assert srv.chat_hits == len(reference) // K + len(faults)
        # One request in flight per task: never more than the tasks the node runs at once.
        assert srv.max_in_flight <= min(TASKS, slurm.cpus)
    for i in range(TASKS):  # every shard holds K samples of each of its questions
        qids = [s["qid"] for s in read_jsonl(run / "shards" / f"samples.{i}.jsonl")]
        assert qids and all(qids.count(q) == K and shard_of(q, TASKS) == i for q in qids)
        assert (run / "shards" / f"samples.{i}.jsonl.rejects.jsonl").exists()
    check_passed(run / "shards", TASKS)
    merge_as_documented(run, TASKS, env)
    check_merged(run, reference)


def test_a_failed_task_fails_the_array_and_resumes_alone(
    slurm: Slurm, data: Path, reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    """MAX_RETRIES=0: the first request's 500 ends its task, and Slurm shows it FAILED; that
    task re-submitted alone (`--array=I --export=ALL,N=4`) finishes the run."""
    run = new_run(data, tmp_path)
    with FakeOpenAIServer(script=["500"]) as srv:
        env = settings(srv.base_url, CONCURRENCY="1")
        few_retries = {**env, "MAX_RETRIES": "0"}
        job, states = run_array(slurm, tmp_path, few_retries, f"--array=0-{TASKS - 1}")
        failed = [i for i, state in states.items() if state == ("FAILED", "2:0")]  # vpd's 2
        assert len(failed) == 1, states
        assert sum(state == ("COMPLETED", "0:0") for state in states.values()) == TASKS - 1
        log = tmp_path / f"vpd-shard-{job}_{failed[0]}.log"  # the header's --output
        assert "LLM server unavailable" in log.read_text()

        alone = f"--array={failed[0]}", f"--export=ALL,N={TASKS}"
        _, states = run_array(slurm, tmp_path, env, *alone)
        assert states == {failed[0]: ("COMPLETED", "0:0")}, logs(tmp_path)
    merge_as_documented(run, TASKS, env)
    check_merged(run, reference)


def test_a_cancelled_task_resubmitted_alone_resumes(
    slurm: Slurm, data: Path, reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    """scancel one task mid-shard; re-submitted without N it is refused (a one-task array
    is 1 task big) before it writes anything; with N it resumes, writing nothing twice."""
    run = new_run(data, tmp_path)
    owned = [shard_of(r["qid"], TASKS) for r in reference]
    big = max(range(TASKS), key=owned.count)  # the shard with the most questions to cut
    shard = run / "shards" / f"samples.{big}.jsonl"
    with FakeOpenAIServer(latency_s=0.3) as srv:  # slow answers: the cut lands mid-shard
        env = settings(srv.base_url, CONCURRENCY="1")
        r = submit(slurm, tmp_path, env, "--parsable", f"--array=0-{TASKS - 1}")
        assert r.returncode == 0, r.stderr
        job = r.stdout.strip().split(";")[0]
        end = time.monotonic() + 300
        while not (shard.exists() and shard.read_text().count("\n") >= K):
            assert time.monotonic() < end, logs(tmp_path)
            time.sleep(0.05)
        assert slurm.run("scancel", f"{job}_{big}").returncode == 0
        states = slurm.wait(job)
        assert states[big][0] == "CANCELLED", states
        assert all(states[i] == ("COMPLETED", "0:0") for i in range(TASKS) if i != big), states
        cut = ids(shard)
        assert 0 < len(cut) < owned.count(big) * K  # cancelled part-way through its shard

        # As the old header said to: the task alone, without N. Refused, nothing written.
        # `sbatch --wait` exits non-zero when a task failed (how a user's script would know).
        r = submit(slurm, tmp_path, env, "--wait", "--parsable", f"--array={big}")
        assert r.returncode == 2, r.stdout + r.stderr
        log = tmp_path / f"vpd-shard-{r.stdout.strip()}_{big}.log"
        assert f"--array={big} --export=ALL,N={TASKS}" in log.read_text()
        assert ids(shard) == cut

        _, states = run_array(slurm, tmp_path, env, f"--array={big}", f"--export=ALL,N={TASKS}")
        assert states == {big: ("COMPLETED", "0:0")}, logs(tmp_path)
    resumed = ids(shard)
    assert resumed[: len(cut)] == cut and len(resumed) == len(set(resumed))
    merge_as_documented(run, TASKS, env)
    check_merged(run, reference, same_text=False)
