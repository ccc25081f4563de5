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


def test_the_shared_head_is_each_prompts_own_system_message() -> None:
    """Where the engine's shared head ends is a function of each prompt (its system message),
    never the longest prefix a batch happens to share: a question sampled alone (as on
    resume) is split where it is split beside others, so its arithmetic is the same."""
    from vpd.sample.prompt import PromptTemplate

    llm = make_llm(LLMConfig(backend="local", batch_size=6))
    t = PromptTemplate("viper/v1")
    msgs = [t.messages(q, 2) for q in ("How many red circles?", "Is the square left of a star?")]
    ids = [llm.prompt_ids(m) for m in msgs]
    heads = {llm.head_len(m, i) for m, i in zip(msgs, ids, strict=True)}
    (h,) = heads
    assert llm.tok.decode(ids[0][:h]).endswith(t.system + "<|im_end|>\n")
    assert llm.head_len(msgs[0][1:], llm.prompt_ids(msgs[0][1:])) == 0  # no system message

    calls = []
    generate = llm.engine.generate

    def spy(prompts, *a, prefix_len=None, **k):
        calls.append((len(prompts), prefix_len))
        return generate(prompts, *a, prefix_len=prefix_len, **k)

    llm.engine.generate = spy
    params = GenParams(n=2, temperature=0.7, max_tokens=24, seeds=[1, 2], stop=["\n```"])
    other = [{"role": "system", "content": "Answer briefly."}, msgs[1][-1]]
    together = llm.generate(msgs + [other], params)
    alone = llm.generate(msgs[1:2], params)
    llm.close()
    # One engine call per distinct head; a lone question keeps the same head.
    assert calls[:2] == [(2, h), (1, llm.head_len(other, llm.prompt_ids(other)))]
    assert calls[2] == (1, h)
    assert [c.text for c in alone[0]] == [c.text for c in together[1]]
