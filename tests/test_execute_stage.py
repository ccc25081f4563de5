"""run_execute: records, statuses, traces, rejects, shards, resume (incl. kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, read_jsonl, write_jsonl, write_png
from tests.test_sandbox_escapes import FAKE_NS, FakeTools
from vpd.errors import VpdError
from vpd.execute import ExecuteConfig, run_execute

OK = "def execute_command(image):\n    return len(image.find('cat'))\n"
SLOW = (
    "def execute_command(image):\n    n = 0\n    for i in range(300000):\n        n += i\n"
    "    return image.exists('dog')\n"
)


def _setup(tmp: Path, programs: dict[str, str], n_q: int = 2) -> tuple[Path, Path]:
    (tmp / "img").mkdir(exist_ok=True)
    qs = []
    for i in range(n_q):
        write_png(tmp / "img" / f"{i}.png")
        qs.append({"id": f"q{i}", "image": f"img/{i}.png", "question": "how many cats?"})
    samples = []
    for i in range(n_q):
        for k, (_name, prog) in enumerate(programs.items()):
            samples.append({"id": f"q{i}#{k}", "qid": f"q{i}", "k": k, "program": prog})
    return write_jsonl(tmp / "q.jsonl", qs), write_jsonl(tmp / "s.jsonl", samples)


def _cfg(tmp: Path, q: Path, s: Path, **kw) -> ExecuteConfig:
    base = dict(
        samples=s,
        questions=q,
        out=tmp / "exec.jsonl",
        timeout=2.0,
        workers=2,
        namespace=FAKE_NS,
        progress=False,
    )
    base.update(kw)
    return ExecuteConfig(**base)


@pytest.fixture(autouse=True)
def _fake_api_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The zygote gets a scrubbed environment; the pool adds the repo so tests.* imports.
    import vpd.execute.pool as pool

    orig = pool.SandboxPool.__init__

    def init(self, *a, **kw):
        kw.setdefault("extra_paths", [str(REPO)])
        orig(self, *a, **kw)

    monkeypatch.setattr(pool.SandboxPool, "__init__", init)


def test_statuses_traces_and_records(tmp_path: Path) -> None:
    progs = {
        "ok": OK,
        "err": "def execute_command(image):\n    return 1 / 0\n",
        "viol": "import os\n",
        "loop": "def execute_command(image):\n    while True:\n        pass\n",
        "print": (
            "def execute_command(image):\n    print('saw', len(image.find('dog')))\n"
            "    return 'x'\n"
        ),
    }
    q, s = _setup(tmp_path, progs, n_q=1)
    tools = FakeTools()
    summary = run_execute(_cfg(tmp_path, q, s, timeout=1.0), tools=tools)
    assert summary["written"] == 5
    assert summary["statuses"] == {"ok": 2, "error": 1, "violation": 1, "timeout": 1}
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "exec.jsonl")}
    assert recs["q0#0"]["status"] == "ok" and recs["q0#0"]["answer"] == "2"
    assert recs["q0#0"]["trace"][0]["name"] == "find"
    assert recs["q0#0"]["trace"][0]["args"] == {"name": "cat"}
    assert recs["q0#0"]["qid"] == "q0" and recs["q0#0"]["k"] == 0
    assert recs["q0#1"]["error"] == "ZeroDivisionError: division by zero (line 2)"
    assert recs["q0#2"]["error"].startswith("Import is not allowed")
    assert recs["q0#3"]["status"] == "timeout"
    assert recs["q0#4"]["stdout"] == "saw 1\n" and recs["q0#4"]["answer"] == "x"
    assert all(r["wall_ms"] >= 0 for r in recs.values())


def test_invalid_samples_rejects_and_missing_images(tmp_path: Path) -> None:
    q, s = _setup(tmp_path, {"ok": OK}, n_q=2)
    image = tmp_path / "img" / "1.png"
    saved = image.read_bytes()
    image.unlink()
    with open(s, "a") as f:
        f.write(
            json.dumps(
                {"id": "q0#7", "qid": "q0", "k": 7, "valid": False, "reason": "no code block"}
            )
            + "\n"
        )
        f.write(json.dumps({"id": "zz#0", "qid": "zz", "k": 0, "program": OK}) + "\n")
        f.write("{not json\n")
    summary = run_execute(_cfg(tmp_path, q, s), tools=FakeTools())
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "exec.jsonl")}
    assert recs["q0#7"]["status"] == "error" and "no code block" in recs["q0#7"]["error"]
    # A missing image is the input's fault: the sample is rejected, not done as an error.
    assert "q1#0" not in recs
    assert recs["q0#0"]["status"] == "ok"
    assert summary["rejected"] == 3
    rej = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "exec.jsonl.rejects.jsonl")}
    assert "not found in" in rej["zz#0"] and rej["q1#0"].startswith("image not found")
    # Once the image is back, the same command executes it: no --force, nothing redone.
    before = (tmp_path / "exec.jsonl").read_text()
    image.write_bytes(saved)
    again = run_execute(_cfg(tmp_path, q, s), tools=FakeTools())
    after = (tmp_path / "exec.jsonl").read_text()
    assert after.startswith(before) and again["written"] == 1
    assert json.loads(after[len(before) :])["id"] == "q1#0"
    assert json.loads(after[len(before) :])["status"] == "ok"


def test_resume_skips_done_and_meta_mismatch(tmp_path: Path) -> None:
    q, s = _setup(tmp_path, {"a": OK, "b": OK}, n_q=3)
    tools = FakeTools()
    first = run_execute(_cfg(tmp_path, q, s), tools=tools)
    assert first["written"] == 6
    calls = tools.calls
    again = run_execute(_cfg(tmp_path, q, s), tools=tools)
    assert again["written"] == 0 and again["already_done"] == 6 and tools.calls == calls
    with pytest.raises(VpdError, match="different config"):
        run_execute(_cfg(tmp_path, q, s, timeout=3.0), tools=tools)


def test_shards_partition_by_question(tmp_path: Path) -> None:
    q, s = _setup(tmp_path, {"a": OK, "b": OK}, n_q=6)
    ids: list[str] = []
    for i in range(2):
        out = tmp_path / f"exec.{i}.jsonl"
        run_execute(_cfg(tmp_path, q, s, out=out, shard=f"{i}/2"), tools=FakeTools())
        recs = read_jsonl(out)
        qids = {r["qid"] for r in recs}
        assert all(f"{qid}#0" in {r["id"] for r in recs} for qid in qids)  # k together
        ids += [r["id"] for r in recs]
    assert sorted(ids) == sorted(f"q{i}#{k}" for i in range(6) for k in range(2))


_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.helpers import REPO
from tests.test_sandbox_escapes import FAKE_NS, FakeTools
from vpd.execute import ExecuteConfig, run_execute
import vpd.execute.pool as pool
orig = pool.SandboxPool.__init__
def init(self, *a, **kw):
    kw.setdefault("extra_paths", [str(REPO)])
    orig(self, *a, **kw)
pool.SandboxPool.__init__ = init
cfg = ExecuteConfig(samples=Path({s!r}), questions=Path({q!r}), out=Path({out!r}), workers=2,
                    namespace=FAKE_NS, progress=False, timeout=5)
print(json.dumps(run_execute(cfg, tools=FakeTools()), default=str))
"""


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    q, s = _setup(tmp_path, {f"p{k}": SLOW for k in range(5)}, n_q=24)
    out = tmp_path / "exec.jsonl"
    code = _CHILD.format(repo=str(REPO), s=str(s), q=str(q), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    data = out.read_bytes()
    kept = data[: data.rfind(b"\n") + 1]  # the complete records; a torn tail is redone
    n_before = kept.count(b"\n")
    assert 10 <= n_before < 120
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # Resumed, not restarted: the killed run's records stay first, byte for byte, and only
    # the rest was executed.
    assert out.read_bytes().startswith(kept)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["already_done"], summary["written"]) == (n_before, 120 - n_before)
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 120
    assert {r["status"] for r in read_jsonl(out)} == {"ok"}
    # The killed run's zygote and children died with it (parent-death signal).
    leftover = subprocess.run(
        ["pgrep", "-f", "vpd.execute.worker import zygote_main"], capture_output=True, text=True
    ).stdout.split()
    assert not [p for p in leftover if _ppid(int(p)) == 1]


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])
