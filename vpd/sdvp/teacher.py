"""The teacher step: the Teacher Input Adapter, and the teacher's answers.

The adapter shows each sub-task to the teacher as its ``view`` (``pointer``: the whole image
with the region drawn as a box, the visual pointer; or ``crop``: the region alone) and, with
``rewrite``, asks the sub-question about the named object (the visual pointer prompt: "What
color is it?" about a ``circle`` -> "What color is the circle in the box?"). Batched greedy
answers, written as they come (``OUT/<variant>/teacher.jsonl``: resumable, a kill -9 loses
at most the batch in flight; with ``shard``, that shard's own file, joined by `vpd merge`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from PIL import Image

from vpd.hardware import resolve_dtype
from vpd.progress import progress_bar
from vpd.records import SubTask, TeacherAnswer
from vpd.sdvp.config import SdvpConfig, SdvpRun, Variant, variants
from vpd.sdvp.images import ImageCache, pixel_box
from vpd.sdvp.tune import model_path, tune_config
from vpd.store import Shard, StageOutput, parse_shard
from vpd.tools.backends.vlm import match_option, options_of, view_image, yes_no
from vpd.tune.model import TINY
from vpd.vlm import (
    ANSWER_SUFFIX,
    Generator,
    clean_answer,
    load_model,
    model_digest,
    resolve_device,
    resolve_model_dir,
)

TEACHER_VERSION = 1  # bump when the adapter's output changes, so old answers are not resumed


_NOUNS = r"(?:object|shape|thing|one|item|region|patch|image|picture)"
_PRONOUN = re.compile(rf"\b(?:this|that)(?:\s+{_NOUNS})?\b|\bit\b", re.IGNORECASE)
_GENERIC = re.compile(rf"\bthe\s+{_NOUNS}\b", re.IGNORECASE)


def pointer_prompt(question: str, name: str | None, boxed: bool = True) -> str:
    """The sub-question about the named object (the paper's visual pointer prompt).

    "What color is it?" about a ``circle`` -> "What color is the circle in the box?"
    (``boxed``: the teacher sees the region as a box on the image; without it, "What
    color is the circle?"). In order: a pronoun ("it", "this", "that shape") becomes the
    object; else a question that names the object gets "in the box" after the name; else a
    generic "the object/shape" becomes the object; else, boxed, the question is asked
    about the box.
    """
    q = " ".join(question.split())
    where = " in the box" if boxed else ""
    target = f"the {name}" if name else ("the object" if boxed else "")
    m = _PRONOUN.search(q)
    if m and target:
        return q[: m.start()] + target + where + q[m.end() :]
    named = re.search(rf"\b{re.escape(name)}\b", q, re.IGNORECASE) if name else None
    if named:
        return q[: named.end()] + where + q[named.end() :]
    m = _GENERIC.search(q)
    if m and target:
        return q[: m.start()] + target + where + q[m.end() :]
    if not boxed:
        return q
    if name:
        return f"Look at the {name} in the box. {q}"
    return q.rstrip(" ?.") + " in the box?" if q.endswith("?") else f"{q} (in the box)"


def teacher_input(
    sub: SubTask, image: Image.Image, view: str, rewrite: bool
) -> tuple[Image.Image, str]:
    """What the teacher sees and is asked for one sub-task (the Teacher Input Adapter)."""
    pic = view_image(image, pixel_box(sub.region, image.size), view)
    q = (
        pointer_prompt(sub.question, sub.object, boxed=view == "pointer")
        if rewrite
        else sub.question
    )
    return pic, q


def teacher_answer(op: str, args: dict[str, Any], reply: str) -> tuple[str | None, str]:
    """The op's result from the teacher's reply, as the student should give it (or why not)."""
    if op == "verify_property":
        yn = yes_no(reply)
        return (yn, "") if yn else (None, "not a yes/no answer")
    if op == "best_text_match":
        opt = match_option(reply, options_of(args))
        return (opt, "") if opt else (None, "names none of the options")
    ans = clean_answer(reply).lower()
    return (ans, "") if ans else (None, "empty answer")


def _digest(path: str) -> str:
    return model_digest(resolve_model_dir(path))


def teacher_path(out: Path, variant: str, shard: Shard | None = None) -> Path:
    name = (
        "teacher.jsonl" if shard is None else f"teacher.shard-{shard.index}-of-{shard.count}.jsonl"
    )
    return Path(out) / variant / name


def run_teacher(
    cfg: SdvpConfig, variant: Variant, subs: list[SubTask], teacher: str
) -> dict[str, Any]:
    """The teacher answers every distilled sub-task (resumable; batches synced to disk)."""
    shard = parse_shard(cfg.shard)
    out = teacher_path(cfg.out, variant.name, shard)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    fp = {
        "stage": "sdvp-teacher",
        "version": TEACHER_VERSION,
        # The model's content, not its path: a moved or copied run keeps its answers.
        "teacher_digest": _digest(teacher),
        "dtype": dtype,
        "view": variant.view,
        "rewrite": variant.rewrite,
        "prompt": ANSWER_SUFFIX,
        "decoding": "greedy",
        "max_new_tokens": cfg.max_new_tokens,
    }
    t0 = time.perf_counter()
    with StageOutput(out, fp, shard=shard, force=cfg.force) as so:
        mine = [s for s in subs if so.owns(s.id)]
        todo = [s for s in mine if not so.done(s.id)]
        usable = 0
        if todo:
            model, processor = load_model(teacher, dtype, device)
            gen = Generator(model, processor)
            images = ImageCache()
            label = f"sdvp teacher ({variant.name})"
            with progress_bar(label, len(todo), unit="sub-tasks", enabled=cfg.progress) as bar:
                for i in range(0, len(todo), cfg.batch_size):
                    batch = todo[i : i + cfg.batch_size]
                    ready, pics, prompts = [], [], []
                    for s in batch:
                        try:
                            pic, q = teacher_input(
                                s, images.get(s.image), variant.view, variant.rewrite
                            )
                        except Exception as e:  # noqa: BLE001 - an unreadable image / empty patch
                            so.write(_no_answer(s, variant, f"no teacher input: {e}"))
                            continue
                        ready.append((s, q))
                        pics.append(pic)
                        prompts.append(gen.prompt(q, ANSWER_SUFFIX))
                    raw = gen.generate(pics, prompts, cfg.max_new_tokens) if ready else []
                    for (s, q), r in zip(ready, raw, strict=True):
                        ans, why = teacher_answer(s.op, s.args, r)
                        usable += ans is not None
                        so.write(
                            TeacherAnswer(
                                id=s.id,
                                op=s.op,
                                question=s.question,
                                teacher_question=q,
                                view=variant.view,
                                raw=r,
                                answer=ans,
                                reason=why,
                            )
                        )
                    so.sync()
                    bar.advance(len(batch))
            del model, gen
        written = so.written
    return {
        "file": str(out),
        "answered": written,
        "usable_new": usable,
        "already_done": len(mine) - len(todo),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def _no_answer(s: SubTask, variant: Variant, why: str) -> TeacherAnswer:
    return TeacherAnswer(
        id=s.id,
        op=s.op,
        question=s.question,
        teacher_question="",
        view=variant.view,
        raw="",
        answer=None,
        reason=why[:300],
    )


def teacher_step(run: SdvpRun) -> None:
    """The teacher (resolved to a folder) answers each variant's view of the sub-tasks to
    distil; ``report.variants.*.teacher``."""
    cfg = run.cfg
    # ``tiny`` as the teacher is the tiny VLM the students start from (their tune options).
    tiny = tune_config(cfg, variants(cfg)[0]).model_dump() if cfg.teacher == TINY else None
    run.teacher = model_path(cfg.teacher, tiny)
    for v in variants(cfg):
        run.report["variants"][v.name]["teacher"] = run_teacher(cfg, v, run.distil, run.teacher)
