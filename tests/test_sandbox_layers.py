"""Each sandbox layer on its own, and the pool's recovery from dying workers."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_sandbox_escapes import FAKE_NS, FakeTools
from vpd.execute.pool import Job, Limits, SandboxPool
from vpd.execute.static import check_program
from vpd.execute.worker import CHILD_FD, _libc, lock_down, to_answer

OK = "def execute_command(image):\n    return len(image.find('cat'))\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot/setuid layers need root")
def test_lock_down_alone_blocks_files_and_fork(tmp_path: Path) -> None:
    """Without the audit hook or static check, the process layer still holds."""
    root = tmp_path / "root"
    root.mkdir(mode=0o555)
    secret = tmp_path / "secret.txt"
    secret.write_text("s")
    secret.chmod(0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.dup2(w, CHILD_FD)
            cfg = {
                "root": str(root),
                "uid": 65534,
                "gid": 65534,
                "limits": {"cpu_s": 5, "as_bytes": 1 << 34, "recursion": 200},
            }
            lock_down(cfg, _libc(), os.open(os.devnull, os.O_RDWR))
            res = []
            for attempt in (
                lambda: open(str(secret)).read(),
                lambda: open("/etc/passwd").read(),
                lambda: open("/new-file", "w").write("x"),
                lambda: os.fork(),
            ):
                try:
                    attempt()
                    res.append("1")
                except OSError:
                    res.append("0")
            res.append("u" if os.getuid() == 65534 else "r")
            res.append("n" if resource.getrlimit(resource.RLIMIT_NPROC)[0] == 0 else "x")
            os.write(CHILD_FD, "".join(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    got = os.read(r, 100).decode()
    assert got == "0000un", got
    assert secret.read_text() == "s"


@pytest.fixture()
def pool():
    with SandboxPool(
        Limits(timeout_s=2), workers=2, namespace=FAKE_NS, extra_paths=[str(REPO)]
    ) as p:
        yield p


def test_worker_crash_and_garbage_are_contained(pool: SandboxPool) -> None:
    jobs = [
        Job("crash", "def execute_command(image):\n    crash_now()\n", "/i"),
        Job("junk", "def execute_command(image):\n    send_garbage()\n    return 1\n", "/i"),
        Job("after", OK, "/i"),
    ]
    res = {r.id: r for r in pool.run(jobs, FakeTools())}
    assert res["crash"].status == "crash" and "SIGABRT" in res["crash"].error
    assert res["junk"].status == "crash" and "protocol error" in res["junk"].error
    assert (res["after"].status, res["after"].answer) == ("ok", "2")


def test_dead_zygote_is_replaced(pool: SandboxPool) -> None:
    slow = (
        "def execute_command(image):\n    n = 0\n    for i in range(10 ** 6):\n        n += 1\n"
        "    return n\n"
    )

    def jobs():
        for i in range(12):
            if i == 6:
                os.kill(pool._proc.pid, signal.SIGKILL)
                time.sleep(0.1)
            yield Job(str(i), slow if i % 2 else OK, "/i")

    res = list(pool.run(jobs(), FakeTools()))
    assert sorted(int(r.id) for r in res) == list(range(12))  # one result each
    assert pool.stats["zygote_starts"] == 2
    tail = [r for r in res if int(r.id) >= 8]
    assert all(r.status == "ok" for r in tail), [(r.id, r.status, r.error) for r in tail]
    assert all(r.status in ("ok", "crash") for r in res)


def test_answer_conversion() -> None:
    class Patch:
        pass

    assert to_answer(True, Patch) == ("yes", None)
    assert to_answer(False, Patch) == ("no", None)
    assert to_answer(3, Patch) == ("3", None)
    assert to_answer(3.0, Patch) == ("3", None)
    assert to_answer(2.5, Patch) == ("2.5", None)
    assert to_answer("red", Patch) == ("red", None)
    assert to_answer(Patch(), Patch) == (None, "returned an image patch, not an answer")
    assert to_answer(None, Patch)[0] is None
    assert to_answer({"a": 1}, Patch) == (None, "returned a dict, not an answer")


@pytest.mark.parametrize(
    "src",
    [
        "def execute_command(image):\n    xs = sorted(image.find('cat'), key=lambda p: p.left)\n"
        "    return f'{len(xs)} {xs[0].left:>3}' if xs else 'none'\n",
        "THRESH = 0.5\ndef execute_command(image: 'ImagePatch') -> str:\n    n: int = 3\n"
        "    return bool_to_yesno(n > THRESH)\n",
        "def execute_command(image):\n    try:\n        return 1 / 0\n"
        "    except ZeroDivisionError:\n        return 'inf'\n",
        "def execute_command(image):\n    return {k: v for k, v in zip('ab', [1, 2])}['a'] ** 2\n",
    ],
)
def test_typical_programs_pass_static_check(src: str) -> None:
    res = check_program(src)
    assert res.ok, res.reason
