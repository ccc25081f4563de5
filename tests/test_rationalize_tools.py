"""Real tool traces (synthetic backend) through verify + rationalize: every result is told."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import read_jsonl
from vpd.rationalize import RationalizeConfig, run_rationalize
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


# The two scenes the first 8 questions of `vpd data synth --n 40 --seed 0` are asked on:
# the synthetic tools find one square (not large) and two circles in each, and the
# rationale tells each call with its region as [left, lower, right, upper] (fractions of the
# image, y up), ending in the answer. Written out from the traces, not from the code.
RATIONALES = {
    "images/s000000.png": (
        "I look for a square and find one at [0.27, 0.60, 0.38, 0.71]. "
        "I zoom into the region [0.27, 0.60, 0.38, 0.71]. "
        'I ask "what color is it?" in the region [0.27, 0.60, 0.38, 0.71], '
        'and the answer is "yellow". '
        "I check whether the square in the region [0.27, 0.60, 0.38, 0.71] is large: no. "
        "I look for a circle and find 2 at [0.45, 0.12, 0.56, 0.23] and "
        "[0.55, 0.68, 0.67, 0.79]. So the answer is 2."
    ),
    "images/s000001.png": (
        "I look for a square and find one at [0.79, 0.78, 0.90, 0.89]. "
        "I zoom into the region [0.79, 0.78, 0.90, 0.89]. "
        'I ask "what color is it?" in the region [0.79, 0.78, 0.90, 0.89], '
        'and the answer is "orange". '
        "I check whether the square in the region [0.79, 0.78, 0.90, 0.89] is large: no. "
        "I look for a circle and find 2 at [0.28, 0.84, 0.39, 0.95] and "
        "[0.55, 0.26, 0.78, 0.48]. So the answer is 2."
    ),
}


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
    recs = {r["id"]: r for r in read_jsonl(sft)}
    assert {q.image for q in qs} == set(RATIONALES)
    for q, ex in zip(qs, execs, strict=True):
        text = recs[f"{q.id}/rationale"]["messages"][1]["content"][0]["text"]
        assert text == RATIONALES[q.image], (ex.trace, text)
        assert (sft.parent / recs[f"{q.id}/answer"]["image"]).exists()
