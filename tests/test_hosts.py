"""recipes/scale/hosts.sh over real ssh: an sshd (Debian's openssh-server) started for this
module on two free local ports, a key made here, three host aliases of localhost and one
that nothing answers; against the scripted OpenAI server, compared with one process.

Needs openssh-server (.ci/run installs it) and root (sshd's privilege separation);
elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import getpass
import os
import shutil
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
    check_merged,
    check_passed,
    ids,
    make_data,
    new_run,
    reference_samples,
    settings,
    shard_of,
    unavailable,
)
from vpd import net

pytestmark = pytest.mark.slow

SCRIPT = SCALE / "hosts.sh"
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself: it must be started by its full path
GOOD = ["h0", "h1", "h2"]  # h0 and h1 share a port, h2 has the other


@pytest.fixture(scope="module")
def ssh_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running sshd and the ssh client config that reaches it (hosts h0 h1 h2 down)."""
    if not (os.access(SSHD, os.X_OK) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        unavailable(f"no {SSHD}, ssh or ssh-keygen: apt-get install openssh-server (.ci/run does)")
    if os.geteuid() != 0:
        unavailable("sshd's privilege separation needs root (CI runs as root)")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True
        )
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    ports = [net.free_port() for _ in range(3)]  # two for sshd, one nothing listens on
    (root / "sshd_config").write_text(
        f"""Port {ports[0]}
Port {ports[1]}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
"""
    )  # StrictModes no: pytest's temporary folders sit in world-writable /tmp
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation folder
    config = root / "ssh_config"
    config.write_text(
        f"""Host h0 h1
  Port {ports[0]}
Host h2
  Port {ports[1]}
Host down
  Port {ports[2]}
Host *
  HostName 127.0.0.1
  User {getpass.getuser()}
  IdentityFile {root}/user_key
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  ConnectTimeout 10
  LogLevel ERROR
"""
    )
    log = open(root / "sshd.log", "wb")  # noqa: SIM115 - open while sshd runs
    sshd = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        end = time.monotonic() + 30
        while True:
            probe = subprocess.run(["ssh", "-F", str(config), "h2", "true"], capture_output=True)
            if probe.returncode == 0:
                break
            if sshd.poll() is not None or time.monotonic() > end:
                unavailable(f"sshd did not come up: {(root / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield config
    finally:
        sshd.terminate()
        sshd.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("scale-data"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    with FakeOpenAIServer() as srv:
        return reference_samples(data, srv.base_url, tmp_path_factory.mktemp("ref") / "s.jsonl")


def hosts_sh(where: Path, env: dict[str, str], *hosts: str) -> subprocess.CompletedProcess:
    """``hosts.sh run HOST...`` started in ``where``, not in the checkout (run is relative)."""
    return subprocess.run(
        [str(SCRIPT), "run", *hosts],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_three_hosts_match_one_process(
    ssh_config: Path, data: Path, reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    run = new_run(data, tmp_path)
    with FakeOpenAIServer(script=["500", "429:0"]) as srv:  # no server on the default port
        env = settings(srv.base_url, SSH=f"ssh -F {ssh_config}", CONCURRENCY="2", **PASSED)
        r = hosts_sh(tmp_path, env, *GOOD)
    assert r.returncode == 0, r.stdout + r.stderr
    for i, host in enumerate(GOOD):
        assert f"shard {i}/3 on {host}: done" in r.stdout
        qids = {s["qid"] for s in read_jsonl(run / "shards" / f"samples.{i}.jsonl")}
        assert qids and {shard_of(q, 3) for q in qids} == {i}  # host i ran shard i
        assert (run / "shards" / f"samples.{i}.jsonl.rejects.jsonl").exists()
    check_passed(run / "shards", 3)
    check_merged(run, reference)


def test_a_host_down_fails_the_run_and_merges_nothing_unless_asked(
    ssh_config: Path, data: Path, reference: list[dict[str, Any]], tmp_path: Path
) -> None:
    run = new_run(data, tmp_path)
    with FakeOpenAIServer() as srv:
        env = settings(srv.base_url, SSH=f"ssh -F {ssh_config}")
        r = hosts_sh(tmp_path, env, "h0", "down", "h2")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "shard 1/3 on down: FAILED (exit 255)" in r.stderr  # ssh's: connection refused
        assert "failed on down; nothing merged" in r.stderr
        assert not (run / "samples.jsonl").exists() and not (run / "executions.jsonl").exists()
        finished = {
            *ids(run / "shards" / "samples.0.jsonl"),
            *ids(run / "shards" / "samples.2.jsonl"),
        }

        # Asked to: the two finished shards are merged (their work is not redone), and the
        # run still fails.
        hits = srv.chat_hits
        r = hosts_sh(tmp_path, {**env, "MERGE_PARTIAL": "1"}, "h0", "down", "h2")
        assert r.returncode == 1 and "merged the 2 other shards" in r.stderr, r.stderr
        assert srv.chat_hits == hits
        assert set(ids(run / "samples.jsonl")) == finished
        assert {shard_of(r["qid"], 3) for r in read_jsonl(run / "samples.jsonl")} == {0, 2}

        # The same run with the host back: shard 1 is done, and merged in without repeats.
        r = hosts_sh(tmp_path, env, *GOOD)
        assert r.returncode == 0, r.stdout + r.stderr
        shard1 = {x["qid"] for x in reference if shard_of(x["qid"], 3) == 1}
        assert srv.chat_hits == hits + len(shard1)  # one request (K samples) a question
    check_merged(run, reference)
