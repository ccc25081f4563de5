"""`vpd sample` end to end against the fake OpenAI server: resume, kill -9, dead server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import REPO, read_jsonl, run_vpd, vpd_argv
from vpd.errors import ConfigMismatch
from vpd.llm import LLMConfig
from vpd.records import Sample
from vpd.sample import SampleConfig, run_sample


def _questions(path: Path, n: int = 6, bad_line: bool = False) -> Path:
    forms = ["How many red circles are there?", "Is there a blue star?",
             "What color is the small square?", "Are there more circles than stars?"]  # fmt: skip
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"q{i}", "image": "img.png", "question": forms[i % len(forms)]}
            f.write(json.dumps(rec) + "\n")
        if bad_line:
            f.write('{"id": "broken", "question": }\n')
    return path


def _cfg(tmp: Path, srv: FakeOpenAIServer, **kw) -> SampleConfig:
    llm = {"backend": "openai", "base_urls": [srv.base_url], "backoff_base_s": 0.01}
    llm |= kw.pop("llm", {})
    base = {"questions": tmp / "q.jsonl", "out": tmp / "s.jsonl", "k": 3, "progress": False}
    return SampleConfig(**(base | kw), llm=LLMConfig(**llm))


def test_every_qid_k_sampled_once_with_provenance(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", bad_line=True)
    with FakeOpenAIServer() as srv:
        s = run_sample(_cfg(tmp_path, srv, seed=4))
        again = run_sample(_cfg(tmp_path, srv, seed=4))
        hits = srv.chat_hits
    recs = read_jsonl(tmp_path / "s.jsonl", Sample)
    assert sorted(r.id for r in recs) == sorted(f"q{i}#{k}" for i in range(6) for k in range(3))
    assert s["written"] == 18 and s["valid"] == 18 and s["rejected"] == 1
    assert again["written"] == 0 and again["already_done"] == 18 and hits == 6  # n=3 per request
    r = recs[0]
    assert r.model == "fake-model" and r.prompt_id.startswith("viper/v1@") and r.syntax == "viper"
    assert r.seed == 4000 and r.temperature == 0.5 and r.usage.prompt_tokens > 0
    assert r.program.startswith("def execute_command(image):")
    rejects = (tmp_path / "s.jsonl.rejects.jsonl").read_text()
    assert "malformed JSON" in rejects
    # The prompt holds the system text, the retrieved shots (a user and an assistant turn
    # each; SampleConfig's default count), and the question last.
    msgs = srv.requests[0]["messages"]
    shots = SampleConfig.model_fields["shots"].default
    assert msgs[0]["role"] == "system" and "def find(self" in msgs[0]["content"]
    assert len(msgs) == 1 + 2 * shots + 1 and msgs[-1]["content"] in {
        "How many red circles are there?", "Is there a blue star?",
        "What color is the small square?", "Are there more circles than stars?"}  # fmt: skip


def test_non_programs_are_kept_as_invalid(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=2)

    def chatter(msgs, seed, i):
        return "I cannot see the image." if i == 0 else "```python\ndef execute_command(image):\n"

    with FakeOpenAIServer(reply=chatter) as srv:
        s = run_sample(_cfg(tmp_path, srv, k=2))
    recs = read_jsonl(tmp_path / "s.jsonl", Sample)
    assert s["invalid"] == 4 and len(recs) == 4
    assert all(not r.valid and r.reason for r in recs)
    assert {r.reason for r in recs if r.k == 0} == {"no function definition in the completion"}
    assert all(r.model_extra["raw"] for r in recs if r.k == 0)


def test_resume_asks_only_missing_samples_and_k_can_grow(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=4)
    with FakeOpenAIServer() as srv:
        run_sample(_cfg(tmp_path, srv))
        lines = (tmp_path / "s.jsonl").read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not ln.startswith('{"id":"q1#1"')]
        (tmp_path / "s.jsonl").write_text("".join(keep) + '{"id":"q2#')  # + a torn tail
        before = srv.chat_hits
        s = run_sample(_cfg(tmp_path, srv))
        assert s["written"] == 1 and srv.chat_hits == before + 1
        assert srv.requests[-1].get("n") is None and srv.requests[-1]["seed"] == 1  # k=1
        s = run_sample(_cfg(tmp_path, srv, k=5))  # more samples per question: same file
    assert s["written"] == 8
    ids = [r.id for r in read_jsonl(tmp_path / "s.jsonl", Sample)]
    assert len(ids) == len(set(ids)) == 20


def test_limit_takes_the_first_questions(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=6)
    with FakeOpenAIServer() as srv:
        s = run_sample(_cfg(tmp_path, srv, limit=2))
        assert s["questions"] == 2 and s["written"] == 6
        s = run_sample(_cfg(tmp_path, srv, limit=4))  # a higher limit continues the file
    assert s["written"] == 6 and {r.qid for r in read_jsonl(tmp_path / "s.jsonl", Sample)} == {
        "q0", "q1", "q2", "q3"}  # fmt: skip


def test_meta_mismatch_and_force(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=2)
    with FakeOpenAIServer() as srv:
        run_sample(_cfg(tmp_path, srv))
        with pytest.raises(ConfigMismatch, match="temperature"):
            run_sample(_cfg(tmp_path, srv, temperature=0.9))
        with pytest.raises(ConfigMismatch, match="prompt_id"):
            run_sample(_cfg(tmp_path, srv, prompt="visprog/v1"))
        s = run_sample(_cfg(tmp_path, srv, temperature=0.9, force=True))
    assert s["written"] == 6 and list(tmp_path.glob("s.jsonl.*.bak"))


def test_shards_split_questions(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=12)
    with FakeOpenAIServer() as srv:
        for i in range(3):
            run_sample(_cfg(tmp_path, srv, shard=f"{i}/3", out=tmp_path / f"s{i}.jsonl"))
    parts = [{r.qid for r in read_jsonl(tmp_path / f"s{i}.jsonl", Sample)} for i in range(3)]
    assert set().union(*parts) == {f"q{i}" for i in range(12)}
    assert sum(len(p) for p in parts) == 12


def test_visprog_prompt(tmp_path: Path) -> None:
    _questions(tmp_path / "q.jsonl", n=2)

    def vp(msgs, seed, i):
        return "```\nBOX0=LOC(image=IMAGE,object='red circle')\nANSWER0=COUNT(box=BOX0)\n```"

    with FakeOpenAIServer(reply=vp) as srv:
        s = run_sample(_cfg(tmp_path, srv, prompt="visprog/v1", k=1))
    recs = read_jsonl(tmp_path / "s.jsonl", Sample)
    assert s["valid"] == 2 and recs[0].syntax == "visprog"
    assert recs[0].program.splitlines()[-1] == "FINAL_RESULT=RESULT(var=ANSWER0)"


def test_dead_server_exits_2_and_keeps_records(tmp_path: Path) -> None:
    q = _questions(tmp_path / "q.jsonl", n=6)
    out = tmp_path / "s.jsonl"
    with FakeOpenAIServer(script=["ok"] * 2, default="500") as srv:
        r = run_vpd("sample", str(q), "--out", str(out), "--backend", "openai",
                    "--base-url", srv.base_url, "--k", "2", "--concurrency", "1",
                    "--max-retries", "2", "--no-progress", timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "error: LLM server unavailable" in r.stderr and "Traceback" not in r.stderr
    assert len(read_jsonl(out, Sample)) == 4  # the two questions answered before the server died
    assert srv.chat_hits == 2 + 3  # then one request tried 1 + 2 times


def test_kill_9_then_resume_has_no_duplicates(tmp_path: Path) -> None:
    q = _questions(tmp_path / "q.jsonl", n=40)
    out = tmp_path / "s.jsonl"
    with FakeOpenAIServer(latency_s=0.05, n_supported=False) as srv:
        args = vpd_argv("sample", str(q), "--out", str(out), "--backend", "openai",
                        "--base-url", srv.base_url, "--k", "3", "--concurrency", "2",
                        "--no-progress")  # fmt: skip
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 10:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = out.read_bytes()
        kept = data[: data.rfind(b"\n") + 1]  # the complete samples; a torn tail is redone
        partial = kept.count(b"\n")
        assert 10 <= partial < 120
        asked = -1  # the killed run's last requests may still be arriving: let them land
        while asked != len(srv.requests) or srv.in_flight:
            asked = len(srv.requests)
            time.sleep(0.2)
        r = run_vpd("sample", str(q), "--out", str(out), "--backend", "openai",
                    "--base-url", srv.base_url, "--k", "3", "--concurrency", "2",
                    "--no-progress", timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # Resumed, not restarted: the killed run's samples stay first, byte for byte, and the
    # re-run asked the LLM only for the others (one n=1 request per sample; the server
    # refuses n > 1, so those requests make none).
    assert out.read_bytes().startswith(kept)
    singles = [b for b in srv.requests[asked:] if int(b.get("n") or 1) == 1]
    assert len(singles) == 120 - partial
    ids = [r.id for r in read_jsonl(out, Sample)]
    assert len(ids) == len(set(ids)) == 120
