"""The ``labels`` arm's training data: the answer task with human labels only.

The usual instruction tuning VPD is measured against: one ``answer`` record per training
question, its human label as the reply, and no rationale. Records are built with
:mod:`vpd.rationalize`'s own builders, so the file differs from VPD's mix (``vpd rationalize
--add-labelled``) only by what the programs add: rationale records, and program answers in
place of labels where a program was kept.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.progress import progress_bar
from vpd.rationalize import answer_record, labelled_answer, sft_image
from vpd.records import Question
from vpd.store import StageOutput, read_records


class LabelsConfig(BaseModel):
    """Questions in, labels-only SFT records out (resumable like every stage)."""

    model_config = ConfigDict(extra="forbid")

    questions: Path
    out: Path
    force: bool = False
    progress: bool = True


@with_config(ConfigDict(extra="forbid"))
class LabelsSummary(TypedDict, total=False):
    """What the labels arm's SFT builder returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    questions: int
    answer_records: int
    without_label: int
    rejects: int
    wall_s: float


def run_labels(cfg: LabelsConfig) -> LabelsSummary:
    """Write an ``answer`` record per labelled question; returns a summary."""
    t0 = time.time()
    if cfg.out.resolve() == cfg.questions.resolve():
        raise VpdError(f"--out {cfg.out} is also the questions file")
    fp = {"stage": "labels", "task": "answer", "source": "label"}
    written = unlabelled = 0
    with StageOutput(cfg.out, fp, force=cfg.force) as so:
        questions = list(read_records(cfg.questions, Question, so.rejects))
        with progress_bar("labels", len(questions), "q", cfg.progress) as bar:
            for q in questions:
                label = labelled_answer(q)
                if label is None:
                    unlabelled += 1
                elif not so.done(f"{q.id}/answer"):
                    image = sft_image(q, cfg.questions, cfg.out)
                    so.write(answer_record(q.id, image, q.question, label, source="label"))
                    written += 1
                bar.advance()
        rejected = so.rejects.count
    return {
        "out": str(cfg.out),
        "questions": len(questions),
        "answer_records": written,
        "without_label": unlabelled,
        "rejects": rejected,
        "wall_s": round(time.time() - t0, 3),
    }
