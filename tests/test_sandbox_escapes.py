"""The escape corpus against the real sandbox: nothing leaks, the run goes on."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from tests.escapes.corpus import BAD, ESCAPES
from tests.helpers import REPO
from vpd.execute.pool import Job, Limits, SandboxPool
from vpd.records import ToolCall
from vpd.tools.protocol import ToolResponse

FAKE_NS = "tests.escapes.fake_api:build_namespace"
MARKER = Path("/tmp/vpd_escape_marker")


class FakeTools:
    """Answers find/exists/simple_query from a fixed scene; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def call_batch(self, reqs):
        out = []
        for r in reqs:
            self.calls += 1
            if r.op == "find":
                n = {"cat": 2, "dog": 1}.get(r.args.get("name"), 0)
                out.append(ToolResponse(True, [[i * 10, 0, i * 10 + 5, 5] for i in range(n)]))
            elif r.op == "exists":
                out.append(ToolResponse(True, r.args.get("name") in ("cat", "dog")))
            elif r.op == "simple_query":
                out.append(ToolResponse(True, "red"))
            else:
                out.append(ToolResponse(False, error=f"unknown op {r.op}"))
        return out

    def summarize(self, req, result):
        return ToolCall(name=req.op, args=req.args, result=str(result)[:100])


BENIGN = [
    ("count_cats", "def execute_command(image):\n    return len(image.find('cat'))\n", "2"),
    ("has_dog", "def execute_command(image):\n    return image.exists('dog')\n", "yes"),
    (
        "helper",
        "def helper(p, acc=[]):\n    acc.append(p)\n    return len(acc)\n"
        "def execute_command(image):\n    return helper(1) + len(image.find('dog'))\n",
        "2",
    ),
    ("math", "def execute_command(image):\n    return round(math.sqrt(16.0))\n", "4"),
    (
        "format_ok",
        "def execute_command(image):\n"
        "    return '{} {n}'.format(len(image.find('cat')), n='cats')\n",
        "2 cats",
    ),
]


def _sentinels(tmp: Path) -> dict[Path, str]:
    files = {}
    for i in range(3):
        p = tmp / f"sentinel{i}.txt"
        p.write_text(f"secret {i}\n")
        p.chmod(0o666)  # only the sandbox, not permissions, keeps programs out
        files[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(
        Limits(timeout_s=1.5, memory_mb=256, max_tool_calls=50, max_stdout=4096),
        workers=2,
        namespace=FAKE_NS,
        extra_paths=[str(REPO)],
    ) as p:
        yield p


@pytest.fixture()
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


def test_escape_corpus(pool: SandboxPool, listener: socket.socket, tmp_path: Path) -> None:
    assert len(ESCAPES) >= 45
    MARKER.unlink(missing_ok=True)
    sentinels = _sentinels(tmp_path)
    port = listener.getsockname()[1]
    jobs, expect = [], {}
    for i, (name, src, statuses) in enumerate(ESCAPES):
        src = src.replace("PORT", str(port))
        for p in sentinels:  # aim reads/writes at the sentinels too
            src = src.replace("/etc/passwd", str(p))
        jobs.append(Job(name, src, "/img.png"))
        expect[name] = statuses
        b_name, b_src, b_ans = BENIGN[i % len(BENIGN)]
        jobs.append(Job(f"benign{i}_{b_name}", b_src, "/img.png"))
        expect[f"benign{i}_{b_name}"] = b_ans
    ran = list(pool.run(jobs, FakeTools()))
    results = {r.id: r for r in ran}
    assert len(ran) == len(jobs)  # every job got exactly one result: the run went on
    assert set(results) == set(expect)
    for name, want in expect.items():
        r = results[name]
        if isinstance(want, set):
            assert want <= BAD
            assert r.status in want, f"{name}: {r.status} {r.error}"
            assert r.answer is None, f"{name} leaked an answer: {r.answer!r}"
        else:
            assert (r.status, r.answer) == ("ok", want), f"{name}: {r.status} {r.error}"
    for p, digest in sentinels.items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
    assert not MARKER.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()  # no program reached the host's loopback


def test_runtime_layer_messages(pool: SandboxPool, listener: socket.socket) -> None:
    """Programs that pass the static check but reach a leaky API are stopped at run time."""
    port = str(listener.getsockname()[1])
    jobs = [
        Job(n, s.replace("PORT", port), "/img.png") for n, s, _ in ESCAPES if n.startswith("leak_")
    ]
    results = list(pool.run(jobs, FakeTools()))
    assert len(jobs) >= 5 and len(results) == len(jobs)  # one result per program
    assert sorted(r.id for r in results) == sorted(j.id for j in jobs)
    for r in results:
        assert r.status == "violation"
        assert r.error.startswith("blocked at run time: "), r.error


def test_state_does_not_leak_between_programs(pool: SandboxPool) -> None:
    mutate = "def execute_command(image):\n    registry.append(1)\n    return len(registry)\n"
    look = "def execute_command(image):\n    return len(registry)\n"
    jobs = [Job("m1", mutate, "/i"), Job("m2", mutate, "/i"), Job("look", look, "/i")]
    res = {r.id: r.answer for r in pool.run(jobs, FakeTools())}
    assert res == {"m1": "1", "m2": "1", "look": "0"}


def test_errors_are_one_line_with_program_line(pool: SandboxPool) -> None:
    src = "def execute_command(image):\n    x = [1]\n    return x[5]\n"
    (r,) = pool.run([Job("e", src, "/i")], FakeTools())
    assert r.status == "error"
    assert r.error == "IndexError: list index out of range (line 3)"
    src = "def f(n):\n    return f(n + 1)\ndef execute_command(image):\n    return f(0)\n"
    (r,) = pool.run([Job("r", src, "/i")], FakeTools())
    assert r.status == "error" and r.error.startswith("RecursionError")
    assert "\n" not in r.error
