"""The LLM judge: prompt, verdict parsing, JSONL cache (no repeated questions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import read_jsonl, write_jsonl
from tests.test_verify_stage import make_inputs
from vpd.cli import app
from vpd.judge import LLMJudge, parse_verdict
from vpd.llm.base import Completion, GenParams
from vpd.verify import VerifyConfig, run_verify


class FakeLLM:
    name = "fake"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, batch: list[list[dict[str, Any]]], params: GenParams):
        out = []
        for msgs in batch:
            user = msgs[-1]["content"]
            self.prompts.append(user)
            out.append([Completion(text="Yes." if "crimson" in user else "no")])
        return out

    def close(self) -> None:
        pass


def test_parse_verdict() -> None:
    assert parse_verdict("Yes.") and parse_verdict(" correct, it is") and parse_verdict("TRUE")
    assert not parse_verdict("No") and not parse_verdict("") and not parse_verdict("maybe yes")


def test_judge_caches_verdicts_across_runs(tmp_path: Path) -> None:
    cache = tmp_path / "judge.jsonl"
    llm = FakeLLM()
    j = LLMJudge(llm, cache)
    items = [("What color?", ["red", "red"], "crimson"), ("What color?", ["red"], "blue")]
    assert j.judge(items + items[:1]) == [True, False, True]
    assert len(llm.prompts) == 2  # the duplicate was asked once
    assert "Reference answers: red\n" in llm.prompts[0]
    j2 = LLMJudge(llm, cache)  # a new run reads the cache
    assert j2.judge(items) == [True, False] and len(llm.prompts) == 2
    assert [json.loads(x)["verdict"] for x in cache.read_text().splitlines()] == [True, False]


def test_run_verify_with_llm_judge(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    ex = read_jsonl(paths["executions"])
    for r in ex:
        if r["id"] == "q3#1":
            r.update(status="ok", answer="crimson", error=None)
    write_jsonl(paths["executions"], ex)
    cfg = VerifyConfig(out=tmp_path / "v.jsonl", progress=False, judge=True, **paths)
    s = run_verify(cfg, judge=LLMJudge(FakeLLM(), tmp_path / "v.jsonl.judge.jsonl"))
    assert s["funnel"]["judged_correct"] == 1 and s["judge_calls"] == 1
    assert (tmp_path / "v.jsonl.judge.jsonl").exists()


def test_cli_judge_is_an_openai_server_from_backend_and_base_url(tmp_path: Path) -> None:
    paths = make_inputs(tmp_path)
    ex = read_jsonl(paths["executions"])
    for r in ex:
        if r["id"] == "q3#1":
            r.update(status="ok", answer="crimson", error=None)
    write_jsonl(paths["executions"], ex)
    out = tmp_path / "v.jsonl"
    args = ["verify", str(paths["executions"]), "--samples", str(paths["samples"]),
            "--questions", str(paths["questions"]), "--out", str(out), "--no-progress",
            "--judge", "--backend", "openai", "--model", "judge-7b"]  # fmt: skip

    def reply(messages: list[dict[str, Any]], seed: int | None, i: int) -> str:
        return "Yes." if "Candidate answer: crimson" in messages[-1]["content"] else "No."

    with FakeOpenAIServer(reply=reply) as srv:
        res = CliRunner().invoke(app, [*args, "--base-url", srv.base_url])
        assert res.exit_code == 0, res.output
    # One open answer the metric rejected ("crimson" for "red"): one request, to that
    # server, for that model, with the judge prompt.
    assert srv.chat_hits == 1
    (body,) = srv.requests
    assert body["model"] == "judge-7b"
    user = body["messages"][-1]["content"]
    assert "Reference answers: red\n" in user and "Candidate answer: crimson\n" in user
    v = {r["id"]: r for r in read_jsonl(out)}
    assert v["q3#1"]["kept"] and v["q3#1"]["judged"] and v["q3#1"]["score"] == 1.0
    assert [r["verdict"] for r in read_jsonl(tmp_path / "v.jsonl.judge.jsonl")] == [True]
    judge = json.loads((tmp_path / "v.jsonl.meta.json").read_text())["config"]["judge_config"]
    assert judge["llm"]["backend"] == "openai" and judge["llm"]["model"] == "judge-7b"
