"""`run_verify`: policies on constructed executions, funnel counts, resume, rejects, judge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_jsonl, read_rejects, run_vpd, vpd_argv, write_jsonl
from vpd.errors import ConfigMismatch
from vpd.verify import VerifyConfig, run_verify

# q1 (count, gold 3): k0 wrong "2", k1 right "three" (long), k2 right "3" (short), k3 error
# q2 (yes/no, gold yes): k0 "no", k1 "no", k2 "yes"   -> majority is "no"
# q3 (attribute, gold red): k0 invalid sample, k1 timeout
PROGRAMS = {
    ("q1", 0): "return 2",
    ("q1", 1): "patches = image_patch.find('circle')\nx = len(patches)\nreturn str(x)",
    ("q1", 2): "return len(image_patch.find('circle'))",
    ("q1", 3): "return boom",
    ("q2", 0): "return 'no'",
    ("q2", 1): "return 'no'",
    ("q2", 2): "return 'yes'",
    ("q3", 0): "",
    ("q3", 1): "while True: pass",
}
EXECS = {
    ("q1", 0): {"status": "ok", "answer": "2"},
    ("q1", 1): {"status": "ok", "answer": "three"},
    ("q1", 2): {"status": "ok", "answer": "3"},
    ("q1", 3): {
        "status": "error",
        "error": "Traceback (most recent call last):\nNameError: name 'boom' is not defined",
    },
    ("q2", 0): {"status": "ok", "answer": "no"},
    ("q2", 1): {"status": "ok", "answer": "No"},
    ("q2", 2): {"status": "ok", "answer": "yes"},
    ("q3", 1): {"status": "timeout", "error": "wall-clock limit 10s"},
}


def make_inputs(tmp: Path, execs: dict | None = None) -> dict[str, Path]:
    questions = [
        {"id": "q1", "image": "i1.png", "question": "How many circles?", "answers": ["3"],
         "dataset": "synth", "meta": {"qtype": "count"}},
        {"id": "q2", "image": "i2.png", "question": "Is there a square?", "answers": ["yes"],
         "dataset": "synth", "meta": {"qtype": "exists"}},
        {"id": "q3", "image": "i3.png", "question": "What color is the circle?",
         "answers": ["red"], "dataset": "synth", "meta": {"qtype": "attribute"}},
        {"id": "q4", "image": "i4.png", "question": "Unsampled?", "answers": ["x"]},
    ]  # fmt: skip
    samples = []
    for (qid, k), prog in PROGRAMS.items():
        s = {"id": f"{qid}#{k}", "qid": qid, "k": k, "program": prog}
        if not prog:
            s.update(valid=False, reason="no code block in the LLM output")
        samples.append(s)
    execs = EXECS if execs is None else execs
    ex_rows = [{"id": f"{qid}#{k}", "qid": qid, "trace": [], **e} for (qid, k), e in execs.items()]
    return {
        "questions": write_jsonl(tmp / "q.jsonl", questions),
        "samples": write_jsonl(tmp / "s.jsonl", samples),
        "executions": write_jsonl(tmp / "e.jsonl", ex_rows[::-1]),  # order must not matter
    }


def _cfg(tmp: Path, **kw: Any) -> VerifyConfig:
    paths = make_inputs(tmp)
    return VerifyConfig(out=tmp / "v.jsonl", progress=False, **paths, **kw)


def _by_id(out: Path) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_jsonl(out)}


def test_every_sample_gets_a_record_with_a_reason(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, policy="all")
    summary = run_verify(cfg)
    v = _by_id(cfg.out)
    assert set(v) == {f"{q}#{k}" for q, k in PROGRAMS}
    assert v["q1#0"]["reason"] == "wrong answer: '2' (score 0.00)"
    assert v["q1#1"]["kept"] and v["q1#2"]["kept"] and v["q1#1"]["reason"] == "kept"
    assert v["q1#3"]["reason"] == "execution error: NameError: name 'boom' is not defined"
    assert v["q3#0"]["reason"].startswith("invalid sample: no code block")
    assert v["q3#1"]["reason"] == "execution timeout: wall-clock limit 10s"
    assert v["q1#2"]["program"] == PROGRAMS[("q1", 2)]
    assert v["q1#2"]["metric"] == "count" and v["q2#2"]["metric"] == "yesno"
    assert summary["written"] == len(PROGRAMS)


def test_policy_first_and_shortest(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    run_verify(_cfg(tmp_path / "a", policy="first"))
    v = _by_id(tmp_path / "a" / "v.jsonl")
    assert [i for i, r in v.items() if r["kept"]] == ["q1#1", "q2#2"]
    assert v["q1#2"]["reason"] == "dropped by policy first"
    (tmp_path / "b").mkdir()
    run_verify(_cfg(tmp_path / "b", policy="shortest"))
    v = _by_id(tmp_path / "b" / "v.jsonl")
    assert sorted(i for i, r in v.items() if r["kept"]) == ["q1#2", "q2#2"]
    assert v["q1#1"]["reason"] == "dropped by policy shortest"


def test_policy_majority(tmp_path: Path) -> None:
    # q1: answers 2, three, 3 -> "3" appears twice after normalization (three -> 3): both kept.
    # q2: "no" x2 beats "yes": the correct "yes" program disagrees with the consensus.
    run_verify(_cfg(tmp_path, policy="majority"))
    v = _by_id(tmp_path / "v.jsonl")
    assert sorted(i for i, r in v.items() if r["kept"]) == ["q1#1", "q1#2"]
    assert v["q2#2"]["correct"] and not v["q2#2"]["kept"]
    assert v["q2#2"]["reason"].startswith("dropped by policy majority")


def test_funnel_counts_table_and_file(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, policy="first")
    summary = run_verify(cfg)
    fun = json.loads((tmp_path / "v.jsonl.funnel.json").read_text())
    assert fun == summary["funnel"]
    assert fun["questions"] == 4
    assert fun["samples"] == 9
    assert fun["valid_programs"] == 8
    assert fun["ran_ok"] == 6
    assert fun["correct"] == 3  # q1#1, q1#2, q2#2
    assert fun["kept"] == 2
    assert fun["questions_with_kept"] == 2
    assert fun["status"]["timeout"] == 1 and fun["status"]["invalid"] == 1


def test_threshold_flag_lowers_the_bar(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    rows = read_jsonl(paths["questions"])
    rows[0].update(dataset="vqav2", answers=["3"] + ["2"] * 9, meta={})
    write_jsonl(paths["questions"], rows)
    base = {"progress": False, "policy": "all", **paths}
    run_verify(VerifyConfig(out=tmp_path / "d.jsonl", **base))  # default VQA bar 0.3
    v = _by_id(tmp_path / "d.jsonl")
    assert v["q1#0"]["kept"] and v["q1#0"]["score"] == 1.0  # "2": 9 annotators
    assert v["q1#2"]["kept"] and v["q1#2"]["score"] == pytest.approx(0.3)
    run_verify(VerifyConfig(out=tmp_path / "t.jsonl", threshold=0.5, **base))
    v = _by_id(tmp_path / "t.jsonl")
    assert v["q1#0"]["kept"] and not v["q1#2"]["kept"]


def test_resume_after_partial_output_no_duplicates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, policy="first")
    run_verify(cfg)
    full = cfg.out.read_text(encoding="utf-8").splitlines(keepends=True)
    # A kill mid-question: first 5 lines whole plus a torn line.
    cfg.out.write_text("".join(full[:5]) + full[5][:17], encoding="utf-8")
    summary = run_verify(cfg)
    again = read_jsonl(cfg.out)
    assert len(again) == len(full) == len({r["id"] for r in again})
    assert {r["id"]: r for r in again} == {json.loads(x)["id"]: json.loads(x) for x in full}
    assert summary["written"] == len(full) - 5
    # Completed: a re-run writes nothing.
    assert run_verify(cfg)["written"] == 0


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, policy="first")
    run_verify(cfg)
    with pytest.raises(ConfigMismatch):
        run_verify(cfg.model_copy(update={"policy": "all"}))
    s = run_verify(cfg.model_copy(update={"policy": "all", "force": True}))
    assert s["funnel"]["kept"] == 3


def test_pending_executions_wait_unless_allowed(tmp_path: Path) -> None:
    execs = {key: e for key, e in EXECS.items() if key != ("q2", 1)}
    paths = make_inputs(tmp_path, execs)
    cfg = VerifyConfig(out=tmp_path / "v.jsonl", progress=False, **paths)
    s = run_verify(cfg)
    assert s["questions_pending"] == 1
    assert not any(r["qid"] == "q2" for r in read_jsonl(cfg.out))
    make_inputs(tmp_path)  # execution finished
    s = run_verify(cfg)
    assert s["questions_pending"] == 0 and s["written"] == 3
    (tmp_path / "m").mkdir()
    paths = make_inputs(tmp_path / "m", execs)
    cfg = VerifyConfig(out=tmp_path / "m" / "v.jsonl", progress=False, allow_missing=True, **paths)
    run_verify(cfg)
    assert _by_id(cfg.out)["q2#1"]["reason"] == "not executed"


def test_bad_lines_are_rejected_with_reasons(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with open(cfg.executions, "a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write(json.dumps({"id": "q1#9", "qid": "q1", "status": "weird"}) + "\n")
    with open(cfg.samples, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "zz#0", "qid": "zz", "k": 0, "program": "x"}) + "\n")
    s = run_verify(cfg)
    rej = read_rejects(tmp_path / "v.jsonl")
    reasons = " | ".join(r["reason"] for r in rej)
    assert s["rejects"] == 3
    assert "executions: malformed JSON" in reasons
    assert "executions: invalid record: status" in reasons
    assert "unknown question id 'zz'" in reasons
    assert s["written"] == len(PROGRAMS)


def test_shards_partition_questions(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    ids = []
    for i in range(2):
        cfg = VerifyConfig(out=tmp_path / f"v{i}.jsonl", shard=f"{i}/2", progress=False, **paths)
        run_verify(cfg)
        ids += [r["id"] for r in read_jsonl(cfg.out)]
    assert sorted(ids) == sorted(f"{q}#{k}" for q, k in PROGRAMS)


class FakeJudge:
    """Says yes to a fixed set of predictions; records what it was asked."""

    def __init__(self, yes: set[str]) -> None:
        self.yes, self.asked = yes, []

    def judge(self, items: list[tuple[str, list[str], str]]) -> list[bool]:
        self.asked += items
        return [pred in self.yes for _, _, pred in items]


def test_judge_rescues_open_answers_only(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    ex = read_jsonl(paths["executions"])
    for r in ex:
        if r["id"] == "q3#1":
            r.update(status="ok", answer="crimson", error=None)
    write_jsonl(paths["executions"], ex)
    judge = FakeJudge({"crimson"})
    cfg = VerifyConfig(out=tmp_path / "v.jsonl", progress=False, **paths)
    s = run_verify(cfg, judge=judge)
    v = _by_id(cfg.out)
    assert v["q3#1"]["kept"] and v["q3#1"]["judged"] and v["q3#1"]["score"] == 1.0
    # count/yesno answers are never sent to the judge
    assert [p for _, _, p in judge.asked] == ["crimson"]
    assert s["funnel"]["judged_correct"] == 1


def test_kill_9_then_rerun_completes_without_duplicates(tmp_path: Path) -> None:
    # Enough records that the run is still writing long after the first KILL_AT are on
    # disk: the kill always lands mid-run (checked below), so the rerun always resumes.
    n_q, k, kill_at = 10000, 3, 100
    qs, ss, es = [], [], []
    for i in range(n_q):
        qs.append({"id": f"q{i}", "image": "x.png", "question": "How many?", "answers": ["2"],
                   "meta": {"qtype": "count"}})  # fmt: skip
        for j in range(k):
            sid = f"q{i}#{j}"
            ss.append({"id": sid, "qid": f"q{i}", "k": j, "program": "return 2"})
            es.append({"id": sid, "qid": f"q{i}", "status": "ok", "answer": str(2 + j % 2)})
    out = tmp_path / "v.jsonl"
    args = [
        "verify", str(write_jsonl(tmp_path / "e.jsonl", es)),
        "--samples", str(write_jsonl(tmp_path / "s.jsonl", ss)),
        "--questions", str(write_jsonl(tmp_path / "q.jsonl", qs)),
        "--out", str(out), "--no-progress", "--policy", "first",
    ]  # fmt: skip
    proc = subprocess.Popen(vpd_argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < kill_at:
        assert proc.poll() is None, f"verify ended (code {proc.returncode}) before the kill"
        assert time.monotonic() < deadline, "verify wrote too slowly"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    head = out.read_bytes()
    head = head[: head.rfind(b"\n") + 1]  # whole records; a torn tail is rewritten
    killed_at = head.count(b"\n")
    assert kill_at <= killed_at < n_q * k
    r = run_vpd(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes().startswith(head)  # resumed after the killed run's records
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == n_q * k
    kept = [r for r in read_jsonl(out) if r["kept"]]
    assert len(kept) == n_q and all(r["id"].endswith("#0") for r in kept)
