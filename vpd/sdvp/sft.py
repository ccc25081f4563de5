"""The sft step: each usable teacher answer becomes a chat record for the student.

Records in the format ``vpd rationalize`` writes, on exactly what the tool will show and ask
its VLM at run time (the region as the tool views it, saved once per sub-task under
``OUT/images/``; the tool's question), with the answer as the op's result reads it (yes/no,
the option, a short answer): ``OUT/<variant>/sft.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.rationalize import answer_record
from vpd.records import SubTask, TeacherAnswer
from vpd.sdvp.config import SdvpConfig, SdvpRun, Variant, variants
from vpd.sdvp.images import ImageCache, pixel_box
from vpd.store import StageOutput, atomic_file, read_records
from vpd.tools.backends.vlm import view_image
from vpd.vlm import ANSWER_SUFFIX


def student_image(cfg: SdvpConfig, sub: SubTask, images: ImageCache) -> Path:
    """The region as the TOOL shows it to its VLM, saved once (atomically) per sub-task."""
    path = cfg.out / "images" / f"{sub.id}.{cfg.tool_view}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        im = images.get(sub.image)
        pic = view_image(im, pixel_box(sub.region, im.size), cfg.tool_view)
        with atomic_file(path) as tmp:
            pic.save(tmp, format="PNG")
    return path


def write_student_sft(cfg: SdvpConfig, variant: Variant, subs: list[SubTask]) -> dict[str, Any]:
    """Usable teacher answers -> the student's chat records (vpd rationalize's answer format)."""
    teacher_file = cfg.out / variant.name / "teacher.jsonl"
    out = cfg.out / variant.name / "sft.jsonl"
    by_id = {s.id: s for s in subs}
    answers = (
        {
            a.id: a
            for a in read_records(teacher_file, TeacherAnswer, allow_empty=True)
            if a.id in by_id
        }
        if teacher_file.exists()
        else {}
    )
    teacher_meta = json.dumps(
        json.loads(Path(str(teacher_file) + ".meta.json").read_text(encoding="utf-8"))["config"],
        sort_keys=True,
    )
    fp = {
        "stage": "sdvp-sft",
        "teacher": hashlib.sha256(teacher_meta.encode()).hexdigest()[:16],
        "tool_view": cfg.tool_view,
        "prompt": ANSWER_SUFFIX,
    }
    images = ImageCache()
    ops: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    with StageOutput(out, fp, force=cfg.force) as so:
        for sid, a in answers.items():
            rid = f"{sid}/answer"
            if a.answer is None:
                skipped[a.reason or "no answer"] += 1
                continue
            ops[a.op] += 1
            if so.done(rid):
                continue
            sub = by_id[sid]
            try:
                img = student_image(cfg, sub, images)
            except Exception as e:  # noqa: BLE001 - the image went missing since the teacher
                skipped[f"no student image: {type(e).__name__}"] += 1
                continue
            so.write(
                answer_record(
                    sid,
                    os.path.relpath(img, out.parent),
                    sub.question,
                    a.answer,
                    op=sub.op,
                    source="sdvp",
                    teacher_question=a.teacher_question,
                )
            )
        so.sync()
        written = so.written
    return {
        "file": str(out),
        "records": sum(ops.values()),
        "new": written,
        "per_op": dict(ops),
        "skipped": dict(skipped),
    }


def sft_step(run: SdvpRun) -> None:
    """Each variant's student records; ``report.variants.*.sft``. A teacher that gave no
    usable answer at all stops the run here (nothing to tune on)."""
    cfg = run.cfg
    for v in variants(cfg):
        sft = write_student_sft(cfg, v, run.distil)
        run.report["variants"][v.name]["sft"] = sft
        if sft["records"] == 0:
            raise VpdError(
                f"the teacher gave no usable answer ({sft['skipped']}); see "
                f"{cfg.out / v.name / 'teacher.jsonl'}"
            )
