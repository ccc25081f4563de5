"""The embedded default LLM (SmolLM2-135M-Instruct GGUF, in-process) writes parseable programs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpd.execute.static import check_program
from vpd.llm import GenParams, LLMConfig, make_llm
from vpd.records import Sample
from vpd.sample import SampleConfig, run_sample

pytestmark = pytest.mark.slow


def test_local_smollm2_writes_programs_for_synthetic_questions(tmp_path: Path) -> None:
    from vpd.data.synth import generate

    generate(tmp_path / "d", n=40, seed=3)
    qs = [json.loads(x) for x in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    picked = [q for q in qs if q["meta"]["qtype"] in ("count", "exists", "compare")][:3]
    assert len(picked) == 3
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in picked))
    cfg = SampleConfig(
        questions=tmp_path / "q.jsonl",
        out=tmp_path / "s.jsonl",
        k=2,
        max_tokens=96,
        progress=False,
        llm=LLMConfig(backend="local", batch_size=6),
    )
    s = run_sample(cfg)
    recs = [Sample.model_validate_json(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert s["written"] == 6 and len(recs) == 6
    assert recs[0].model == "SmolLM2-135M-Instruct" and recs[0].usage.completion_tokens > 0
    valid = [r for r in recs if r.valid]
    assert len(valid) >= 4, [(r.reason, r.model_extra.get("raw")) for r in recs]
    assert all(check_program(r.program).ok for r in valid)


def test_local_sampling_is_reproducible_and_stops_at_the_fence() -> None:
    llm = make_llm(LLMConfig(backend="local", batch_size=4))
    msgs = [[{"role": "user", "content": "Write a Python function that adds two numbers."}]]
    params = GenParams(n=2, temperature=0.7, max_tokens=48, seeds=[1, 2], stop=["\n```"])
    a, b = llm.generate(msgs, params), llm.generate(msgs, params)
    llm.close()
    assert [c.text for c in a[0]] == [c.text for c in b[0]]
    assert all("\n```" not in c.text for c in a[0])
    assert [c.seed for c in a[0]] == [1, 2] and [c.index for c in a[0]] == [0, 1]
