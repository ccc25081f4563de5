"""Pydantic models of every JSONL record the pipeline reads or writes.

This is the one place the schema lives (see DESIGN.md, "Records"). Every record
has a stable string ``id``; unknown keys are kept (``extra="allow"``) so a
stage never drops what an earlier stage or a user added.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["ok", "error", "timeout", "oom", "violation", "crash"]
STATUSES: tuple[Status, ...] = get_args(Status)  # the same, to test a value against
Syntax = Literal["viper", "visprog"]
Task = Literal["answer", "rationale"]


class Record(BaseModel):
    """Base of all id-keyed records; extra keys survive a read/write round trip."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)


class Question(Record):
    image: str = Field(min_length=1)
    question: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)
    dataset: str = ""
    split: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)

    def all_images(self) -> list[str]:
        """The question's images in order: ``meta.images`` for a two-image question (NLVR2:
        left, right), else ``[image]``. The programs see these, and `vpd view` shows them."""
        more = self.meta.get("images")
        if isinstance(more, list) and len(more) > 1 and all(isinstance(x, str) and x for x in more):
            return list(more)
        return [self.image]


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Sample(Record):
    """One candidate program; ``id = "<qid>#<k>"``.

    ``valid`` is False when the LLM output held no usable program; ``reason``
    says why, so the funnel can count it rather than losing it.
    """

    qid: str
    k: int = Field(ge=0)
    program: str = ""
    syntax: Syntax = "viper"
    model: str = ""
    temperature: float = 0.0
    seed: int | None = None
    prompt_id: str = ""
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    valid: bool = True
    reason: str | None = None


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    result: str = ""
    ms: float = 0.0

    def value(self) -> Any:
        """What the tool returned: ``result`` holds it as JSON (text that is not JSON, such
        as a truncated list, as it is)."""
        try:
            return json.loads(self.result)
        except (json.JSONDecodeError, TypeError):
            return self.result


class Execution(Record):
    qid: str
    status: Status
    answer: str | None = None
    error: str | None = None
    trace: list[ToolCall] = Field(default_factory=list)
    stdout: str = ""
    wall_ms: float = 0.0


class Verified(Record):
    qid: str
    answer: str | None = None
    score: float = 0.0
    kept: bool = False
    reason: str = ""
    program: str = ""
    trace: list[ToolCall] = Field(default_factory=list)


class Sft(Record):
    """A chat-format training record (Hugging Face messages with an image slot)."""

    image: str
    task: Task
    messages: list[dict[str, Any]] = Field(min_length=2)


class WriterExample(Record):
    """One training example of the program writer (`vpd tune-writer`): the sampler's prompt
    for a training question and one program of it that the verifier kept (``id`` = the
    verified record's id, ``source`` = its file)."""

    qid: str
    source: str
    messages: list[dict[str, Any]] = Field(min_length=2)


class Prediction(Record):
    """One answer of a VLM from `vpd eval` (``id`` = question id).

    With ``--rationale`` the extra keys ``rationale``, ``rationale_answer`` and
    ``rationale_score`` are added (absent otherwise).
    """

    qid: str
    prediction: str
    score: float | None = None  # None: the question has no gold answer
    qtype: str = "all"
    metric: str = ""
    raw: str = ""


class SubTask(Record):
    """One VLM sub-task of executed programs (`vpd sdvp`): a tool call asking a VLM.

    ``id`` is a hash of (image, op, args, region), so the same call made by several programs
    (the k samples of a question, or questions about the same image) is one sub-task.
    """

    image: str  # absolute path
    op: str  # simple_query | verify_property | best_text_match
    args: dict[str, Any] = Field(default_factory=dict)  # the call's arguments (no patch)
    region: list[float] = Field(min_length=4, max_length=4)  # [l, lo, r, up] in 0..1, y up
    question: str  # what the tool asks its VLM for this call
    object: str | None = None  # the name the program found the region by, if any
    qids: list[str] = Field(default_factory=list)  # questions whose programs made the call
    qtypes: list[str] = Field(default_factory=list)
    held_out: bool = False  # from a held-out question type: never distilled


class TeacherAnswer(Record):
    """The teacher's answer to one sub-task (``id`` = the sub-task's id)."""

    op: str
    question: str  # the tool's question (what the student will be asked)
    teacher_question: str  # what the teacher was asked (the visual pointer prompt)
    view: str  # crop | pointer: what the teacher saw
    raw: str  # the teacher's generated text
    answer: str | None = None  # the op's result as text (yes/no, an option, a short answer)
    reason: str = ""  # why there is no usable answer


class Reject(BaseModel):
    """A bad input line and why; written to ``<out>.rejects.jsonl``."""

    model_config = ConfigDict(extra="allow")

    line: int
    id: str | None = None
    reason: str
    raw: str


# The record each stage writes, by the ``stage`` its output's meta config names: what
# `vpd merge` checks a shard's lines against.
RECORD_BY_STAGE: dict[str, type[Record]] = {
    "sample": Sample,
    "execute": Execution,
    "verify": Verified,
    "rationalize": Sft,
    "labels": Sft,
    "eval": Prediction,
    "sdvp-teacher": TeacherAnswer,
    "sdvp-sft": Sft,
}

# Fields that tell one record type from the others, most specific first: an execution
# also carries its sample's ``k``, a verified record its execution's ``status``.
_SIGNATURES: tuple[tuple[frozenset[str], type[Record]], ...] = (
    (frozenset({"teacher_question", "view"}), TeacherAnswer),
    (frozenset({"region", "op"}), SubTask),
    (frozenset({"messages", "task"}), Sft),
    (frozenset({"messages", "source", "qid"}), WriterExample),
    (frozenset({"prediction", "qid"}), Prediction),
    (frozenset({"kept", "qid"}), Verified),
    (frozenset({"status", "qid"}), Execution),
    (frozenset({"k", "qid"}), Sample),
    (frozenset({"question", "image"}), Question),
)


def record_model_for(config: Mapping[str, Any]) -> type[Record] | None:
    """The record model of an output, from the config in its meta file (None: unknown)."""
    stage = config.get("stage")
    if isinstance(stage, str) and stage in RECORD_BY_STAGE:
        return RECORD_BY_STAGE[stage]
    if "importer" in config or "generator" in config:  # `vpd data import` / `vpd data synth`
        return Question
    return None


def guess_record_model(obj: Mapping[str, Any]) -> type[Record] | None:
    """The record model a JSON object's fields point to, for files without a meta file."""
    for fields, model in _SIGNATURES:
        if fields.issubset(obj):
            return model
    return None


def sample_id(qid: str, k: int) -> str:
    return f"{qid}#{k}"


def split_sample_id(sid: str) -> tuple[str, int]:
    qid, _, k = sid.rpartition("#")
    return qid, int(k)


# How an error message names each record type: what it is and which command writes it.
_KIND_NAMES: dict[type[Record], str] = {
    Question: "questions (vpd data synth/import)",
    Sample: "samples (vpd sample)",
    Execution: "executions (vpd execute)",
    Verified: "verified programs (vpd verify)",
    Sft: "SFT records (vpd rationalize)",
    Prediction: "predictions (vpd eval)",
    SubTask: "SDVP sub-tasks",
    TeacherAnswer: "SDVP teacher answers",
    WriterExample: "program-writer examples (vpd tune-writer)",
}


def kind_name(model: type[Record]) -> str:
    """``model``'s records as a user knows them, e.g. "executions (vpd execute)"."""
    return _KIND_NAMES.get(model, f"{model.__name__} records")


def wrong_kind(obj: Mapping[str, Any], model: type[Record]) -> type[Record] | None:
    """The other record type ``obj`` is, when its fields say it is not a ``model`` record
    (an executions file given where verified programs are read validates as them)."""
    if model not in _KIND_NAMES:
        return None
    found = guess_record_model(obj)
    return found if found is not None and found is not model else None
