"""`vpd rationalize`: grounded template rationales, SFT record shape, resume, LLM mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_jsonl, write_jsonl, write_png
from vpd.llm.base import Completion, GenParams
from vpd.rationalize import (
    RationalizeConfig,
    describe_call,
    run_rationalize,
    states_answer,
    template_rationale,
)
from vpd.records import Sft, ToolCall

FULL = [0.0, 0.0, 1.0, 1.0]
TRACE = [
    {"name": "find", "args": {"name": "red circle", "patch": FULL},
     "result": "[[0.12,0.3,0.25,0.43],[0.6,0.05,0.7,0.15]]"},
    {"name": "exists", "args": {"name": "star", "patch": [0.5, 0.0, 1.0, 1.0]},
     "result": "false"},
    {"name": "verify_property", "args": {"name": "circle", "prop": "large",
     "patch": [0.12, 0.3, 0.25, 0.43]}, "result": "true"},
    {"name": "simple_query", "args": {"question": "what color is it?",
     "patch": [0.6, 0.05, 0.7, 0.15]}, "result": "\"blue\""},
    {"name": "best_text_match", "args": {"options": ["square", "triangle"], "patch": FULL},
     "result": "\"triangle\""},
    {"name": "compute_depth", "args": {"patch": [0.1, 0.1, 0.2, 0.2]}, "result": "0.4321"},
    {"name": "crop", "args": {"left": 0, "lower": 0, "right": 50, "upper": 50, "patch": FULL},
     "result": "[0.0,0.0,0.5,0.5]"},
    {"name": "llm_query", "args": {"question": "is a tomato a fruit?"}, "result": "\"yes\""},
    {"name": "mystery_op", "args": {"x": 3, "patch": FULL}, "result": "[7, 8]"},
]  # fmt: skip
EXPECTED_MENTIONS = [
    "[0.12, 0.30, 0.25, 0.43]",
    "[0.60, 0.05, 0.70, 0.15]",
    "find 2",
    "a star in the region [0.50, 0.00, 1.00, 1.00]: no",
    "is large: yes",
    '"blue"',
    "best match for the image is triangle",
    "0.43",
    "[0.00, 0.00, 0.50, 0.50]",
    'tomato a fruit?": yes',
    "mystery_op(x=3) and get 7 and 8",
]


def test_template_mentions_every_tool_result_and_ends_with_answer() -> None:
    trace = [ToolCall.model_validate(t) for t in TRACE]
    text = template_rationale(trace, "2")
    for needle in EXPECTED_MENTIONS:
        assert needle in text, needle
    assert text.endswith("So the answer is 2.")
    assert text.count("I look for a red circle") == 1
    # Repeated identical (cached) calls are told once.
    assert template_rationale(trace + trace[:1], "2") == text


def test_find_phrasings() -> None:
    none = ToolCall(name="find", args={"name": "dog", "patch": FULL}, result="[]")
    one = ToolCall(name="find", args={"object_name": "dog", "patch": FULL}, result="[[0,0,1,1]]")
    assert describe_call(none) == "I look for a dog and find none."
    assert describe_call(one) == "I look for a dog and find one at [0.00, 0.00, 1.00, 1.00]."
    assert template_rationale([], "yes") == "So the answer is yes."
    cut = ToolCall(name="find", args={"name": "dot"}, result='[[0,0,0.1,0.1],"+7 more"]')
    assert (
        describe_call(cut)
        == "I look for a dot and find one at [0.00, 0.00, 0.10, 0.10] and +7 more."
    )
    odd = ToolCall(name="find", args={"name": "dot"}, result="backend error")
    assert describe_call(odd) == "I look for a dot: backend error."


def test_template_caps_long_traces() -> None:
    trace = [ToolCall(name="exists", args={"name": f"o{i}"}, result="true") for i in range(10)]
    text = template_rationale(trace, "yes", max_steps=3)
    assert "I take 7 more similar steps." in text and text.endswith("So the answer is yes.")


def test_states_answer() -> None:
    assert states_answer("I see two. So the answer is 2.", "2")
    assert states_answer("I see them. So the answer is two.", "2")
    assert states_answer("Counting gives 3.5 in total.", "3.5")
    assert not states_answer("So the answer is 3. Thanks!", "3")
    assert not states_answer("So the answer is 23.", "3")


# ----------------------------------------------------------------------------- stage


def _v(qid: str, k: int, answer: str, kept: bool, trace: list | None = None) -> dict[str, Any]:
    return {"id": f"{qid}#{k}", "qid": qid, "answer": answer, "score": float(kept),
            "kept": kept, "reason": "kept" if kept else "wrong", "program": f"return {answer!r}",
            "trace": TRACE[:1] if trace is None else trace}  # fmt: skip


def make_inputs(tmp: Path) -> dict[str, Path]:
    for i in (1, 2, 3):  # real images: rationalize rejects a question whose image won't decode
        write_png(tmp / "data" / "images" / f"{i}.png")
    abs_image = write_png(tmp / "abs" / "4.png").resolve()  # an absolute path stays one
    questions = [
        {"id": "q1", "image": "images/1.png", "question": "How many red circles?",
         "answers": ["2"], "dataset": "synth", "meta": {"qtype": "count"}},
        {"id": "q2", "image": "images/2.png", "question": "Is there a star?",
         "answers": ["no"], "dataset": "synth", "meta": {"qtype": "exists"}},
        {"id": "q3", "image": "images/3.png", "question": "What color is the square?",
         "answers": ["blue", "blue", "navy"], "dataset": "synth", "meta": {}},
        {"id": "q4", "image": str(abs_image), "question": "Unlabelled?", "answers": []},
    ]  # fmt: skip
    verified = [
        _v("q1", 0, "3", False),
        _v("q1", 1, "2.0", True),
        _v("q1", 2, "two", True),
        _v("q2", 0, "False", True, TRACE[1:2]),
        _v("q3", 0, "red", False),
    ]
    return {
        "questions": write_jsonl(tmp / "data" / "q.jsonl", questions),
        "verified": write_jsonl(tmp / "v.jsonl", verified),
    }


def _cfg(tmp: Path, **kw: Any) -> RationalizeConfig:
    return RationalizeConfig(
        out=tmp / "sft" / "sft.jsonl", progress=False, **make_inputs(tmp), **kw
    )


def _text(msg: dict[str, Any]) -> str:
    return " ".join(p["text"] for p in msg["content"] if p["type"] == "text")


def test_sft_records_shape_and_image_paths(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    summary = run_rationalize(cfg)
    recs = {r["id"]: r for r in read_jsonl(cfg.out)}
    assert list(recs) == ["q1/answer", "q1/rationale", "q2/answer", "q2/rationale"]
    for r in recs.values():
        Sft.model_validate(r)
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"][0] == {"type": "image"}
        assert (cfg.out.parent / r["image"]).resolve() == (
            tmp_path / "data" / "images" / r["qid"][1:]
        ).with_suffix(".png").resolve()
    a1 = recs["q1/answer"]
    assert _text(a1["messages"][0]) == (
        "How many red circles?\nAnswer the question using a single word or phrase."
    )
    assert _text(a1["messages"][1]) == "2"  # canonical: "2.0" -> "2"
    assert _text(recs["q2/answer"]["messages"][1]) == "no"  # "False" -> "no"
    r1 = recs["q1/rationale"]
    assert _text(r1["messages"][0]).endswith("\nExplain the rationale to answer the question.")
    rationale = _text(r1["messages"][1])
    assert "[0.12, 0.30, 0.25, 0.43]" in rationale and rationale.endswith("So the answer is 2.")
    assert r1["sample"] == "q1#1"  # the first kept program
    assert summary["answer_records"] == 2 and summary["rationale_records"] == 2


def test_per_question_several_rationales(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, per_question=3)
    run_rationalize(cfg)
    ids = [r["id"] for r in read_jsonl(cfg.out)]
    assert ids == ["q1/answer", "q1/rationale/1", "q1/rationale/2", "q2/answer", "q2/rationale/0"]


def test_add_labelled(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, add_labelled=True)
    s = run_rationalize(cfg)
    recs = {r["id"]: r for r in read_jsonl(cfg.out)}
    assert _text(recs["q3/answer"]["messages"][1]) == "blue"  # most common label
    assert recs["q3/answer"]["source"] == "label"
    assert "q3/rationale" not in recs and "q4/answer" not in recs  # q4 has no label
    assert recs["q1/answer"]["source"] == "program"
    assert s["labelled_answer_records"] == 1 and s["questions_without_label"] == 1


def test_resume_partial_and_torn_output(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, add_labelled=True)
    run_rationalize(cfg)
    full = cfg.out.read_text(encoding="utf-8").splitlines(keepends=True)
    cfg.out.write_text(full[0] + full[1][:25], encoding="utf-8")  # killed mid-write
    s = run_rationalize(cfg)
    again = cfg.out.read_text(encoding="utf-8").splitlines(keepends=True)
    assert again == full
    assert s["written"] == len(full) - 1
    assert run_rationalize(cfg)["written"] == 0


class FakeLLM:
    """Replies from a script keyed by the question text; records every call."""

    name = "fake"

    def __init__(self, replies: dict[str, list[str]]) -> None:
        self.replies = replies
        self.calls: list[tuple[int, float]] = []

    def generate(self, batch: list[list[dict[str, Any]]], params: GenParams):
        self.calls.append((len(batch), params.temperature))
        out = []
        for msgs in batch:
            user = msgs[-1]["content"]
            assert "Trace:" in user and ("find(" in user or "exists(" in user)
            key = next(k for k in self.replies if k in user)
            text = self.replies[key].pop(0) if len(self.replies[key]) > 1 else self.replies[key][0]
            out.append([Completion(text=text)])
        return out

    def close(self) -> None:
        pass


def test_llm_mode_checks_answer_retries_and_falls_back(tmp_path: Path) -> None:
    llm = FakeLLM(
        {
            "How many red circles?": ["I spot two red circles at the top left. There are 2."],
            "Is there a star?": ["I look around. So the answer is yes.", "Stars! It is yes."],
        }
    )
    cfg = _cfg(tmp_path, mode="llm", retries=1)
    s = run_rationalize(cfg, llm=llm)
    recs = {r["id"]: r for r in read_jsonl(cfg.out)}
    r1, r2 = recs["q1/rationale"], recs["q2/rationale"]
    assert r1["rationale_mode"] == "llm"
    assert _text(r1["messages"][1]) == (
        "I spot two red circles at the top left. There are 2. So the answer is 2."
    )
    # q2: answer is "no"; both tries said "yes" -> template fallback, counted.
    assert r2["rationale_mode"] == "fallback"
    assert _text(r2["messages"][1]).endswith("So the answer is no.")
    assert "a star in the region [0.50, 0.00, 1.00, 1.00]: no" in _text(r2["messages"][1])
    assert s["llm_fallback_to_template"] == 1 and s["llm_retries"] == 1
    assert llm.calls == [(2, 0.0), (1, 0.7)]  # one batch, then only the failure retried


def test_llm_mode_bad_prompt_version_is_a_user_error(tmp_path: Path) -> None:
    from vpd.errors import VpdError

    with pytest.raises(VpdError, match="prompt"):
        run_rationalize(_cfg(tmp_path, mode="llm", prompt_version="nope"), llm=FakeLLM({}))


LLAVA_LIKE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
)


def test_messages_render_with_a_hf_chat_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    )
    tok.chat_template = LLAVA_LIKE_TEMPLATE
    cfg = _cfg(tmp_path)
    run_rationalize(cfg)
    for r in read_jsonl(cfg.out):
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        assert text.count("<image>") == 1
        assert text.startswith("USER: <image>\n")
        assert "\nASSISTANT: " in text
        assert _text(r["messages"][1]) in text
