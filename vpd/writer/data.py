"""The program writer's training data: the sampler's prompt and a kept program, per example.

Expert iteration (STaR, ReST) tunes the writer on its own programs that the verifier kept.
Each example is the chat the sampler sends for a training question (the writer's prompt
template and shots) followed by one kept program as the assistant's turn, so the tuned
writer is asked exactly as it was taught. Per question, the first ``per_question`` distinct
programs are used (in file order), so easy questions with five identical programs do not
outweigh hard ones.

The leak guard: every program must belong to a question of the training file, and no
question, image or question-with-answer of an excluded split (test, validation) may be in
it; either is an error, never a silent filter, since it means the inputs are mixed up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vpd.errors import VpdError
from vpd.images import resolve_image
from vpd.records import Question, Verified, WriterExample
from vpd.sample.prompt import PromptTemplate
from vpd.store import read_records

_SPACE = re.compile(r"\s+")


@dataclass
class WriterData:
    """The examples and what building them counted."""

    examples: list[WriterExample] = field(default_factory=list)
    verified: int = 0  # verified records read
    kept: int = 0  # of them kept by the verifier
    duplicates: int = 0  # kept programs already used for their question
    over_cap: int = 0  # distinct kept programs past per_question
    questions: int = 0  # training questions with at least one example


def _image_key(questions_file: Path, image: str) -> str:
    """An image as a path that two question files naming it differently agree on."""
    return str(resolve_image(image, Path(questions_file).parent).resolve())


def program_key(program: str) -> str:
    """A program as its distinct-program checks compare it (whitespace runs as one space)."""
    return _SPACE.sub(" ", program.strip())


def split_guard(train: Path, exclude: list[Path]) -> tuple[set[str], set[str]]:
    """The question ids and images of the excluded splits; an error when the training
    questions share one of them (a test question, or its image, among the train ones)."""
    ids: set[str] = set()
    images: set[str] = set()
    for f in exclude:
        for q in read_records(Path(f), Question):
            ids.add(q.id)
            images.add(_image_key(f, q.image))
    for q in read_records(train, Question):
        if q.id in ids:
            raise VpdError(f"question {q.id} of {train} is also in an excluded split")
        if _image_key(train, q.image) in images:
            raise VpdError(
                f"question {q.id} of {train} shows image {q.image}, an image of an excluded "
                "split: the writer must never see a test image"
            )
    return ids, images


def build_examples(
    verified: list[Path],
    questions: Path,
    exclude: list[Path],
    prompt: str,
    shots: int,
    per_question: int,
) -> WriterData:
    """The writer's examples from the kept programs of ``verified`` (files read in order)."""
    banned, _ = split_guard(questions, exclude)
    by_id = {q.id: q for q in read_records(questions, Question)}
    template = PromptTemplate(prompt)
    data = WriterData()
    used: dict[str, set[str]] = {}
    for path in verified:
        for rec in read_records(Path(path), Verified):
            data.verified += 1
            if rec.qid in banned:
                raise VpdError(
                    f"{path}: {rec.id} is a program for {rec.qid}, a question of an excluded "
                    "split (test or validation): the writer trains on training questions only"
                )
            if not rec.kept:
                continue
            data.kept += 1
            q = by_id.get(rec.qid)
            if q is None:
                raise VpdError(
                    f"{path}: {rec.id} answers {rec.qid}, which is not a question of "
                    f"{questions} (the writer trains on the training split's programs only)"
                )
            seen = used.setdefault(rec.qid, set())
            key = program_key(rec.program)
            if key in seen:
                data.duplicates += 1
                continue
            if len(seen) >= per_question:
                data.over_cap += 1
                continue
            seen.add(key)
            messages = template.messages(q.question, shots)
            messages.append({"role": "assistant", "content": template.assistant_turn(rec.program)})
            data.examples.append(
                WriterExample(
                    id=f"{rec.id}@{len(data.examples)}",
                    qid=rec.qid,
                    source=str(path),
                    messages=messages,
                )
            )
    data.questions = sum(1 for s in used.values() if s)
    return data
