"""Real tool traces (synthetic backend) through verify + rationalize: every result is told."""

from __future__ import annotations

import json
from pathlib import Path

from vpd.rationalize import RationalizeConfig, fmt_value, run_rationalize
from vpd.records import Execution, Question, Sample
from vpd.store import read_records
from vpd.verify import VerifyConfig, run_verify

PROGRAM = """def execute_command(image):
    p = ImagePatch(image)
    squares = p.find('square')
    if squares:
        s = squares[0]
        c = p.crop(s.left, s.lower, s.right, s.upper)
        c.simple_query('what color is it?')
        s.verify_property('square', 'large')
    return len(p.find('circle'))
"""


def test_real_traces_become_grounded_rationales(synth_questions: Path, tmp_path: Path) -> None:
    from vpd.tools.backends.synthetic import SyntheticBackend
    from vpd.tools.namespace import run_inprocess
    from vpd.tools.server import ToolServer

    server = ToolServer(SyntheticBackend())
    qs = [q for q in read_records(synth_questions, Question)][:8]
    samples, execs, questions = [], [], []
    for q in qs:
        answer, trace = run_inprocess(PROGRAM, synth_questions.parent / q.image, server)
        # Gold = the program's own answer, so every question keeps its program.
        questions.append(q.model_copy(update={"answers": [answer], "meta": {"qtype": "count"}}))
        samples.append(Sample(id=f"{q.id}#0", qid=q.id, k=0, program=PROGRAM))
        execs.append(Execution(id=f"{q.id}#0", qid=q.id, status="ok", answer=answer, trace=trace))
    for name, rows in (("s", samples), ("e", execs)):
        (tmp_path / f"{name}.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in rows))
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({**r.model_dump(), "image": str(synth_questions.parent / r.image)}) + "\n"
            for r in questions
        )
    )
    v = tmp_path / "v.jsonl"
    run_verify(
        VerifyConfig(executions=tmp_path / "e.jsonl", samples=tmp_path / "s.jsonl",
                     questions=tmp_path / "q.jsonl", out=v, progress=False)
    )  # fmt: skip
    sft = tmp_path / "out" / "sft.jsonl"
    s = run_rationalize(
        RationalizeConfig(verified=v, questions=tmp_path / "q.jsonl", out=sft, progress=False)
    )
    assert s["rationale_records"] == len(qs)
    recs = {json.loads(x)["id"]: json.loads(x) for x in sft.read_text().splitlines()}
    for ex in execs:
        text = recs[f"{ex.qid}/rationale"]["messages"][1]["content"][0]["text"]
        assert text.endswith(f"So the answer is {ex.answer}.")
        for call in ex.trace:
            if call.name == "size":
                continue
            result = json.loads(call.result)
            assert (fmt_value(result) if result != [] else "find none") in text, (call, text)
        assert (sft.parent / recs[f"{ex.qid}/answer"]["image"]).exists()
