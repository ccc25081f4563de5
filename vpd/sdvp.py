"""`vpd sdvp`: stepwise distillation of a teacher into the tools (SDVP, arXiv 2309.09809).

VPD distills whole programs into one VLM; SDVP (VisualProg Distiller) improves the program
pipeline itself. A teacher VLM (a well-trained, task-specific model: the run's own
VPD-tuned VLM, or any VLM folder) answers every VLM step of executed programs, and its
answers are distilled into the VLM the tools call for that step (the student), so the same
programs answer better with the distilled tools:

1. ``collect``: the sub-tasks of the chosen ops (``simple_query``, ``verify_property``,
   ``best_text_match``; VisProg's ``VQA`` step is a ``simple_query``) are read from the
   execution traces of both program syntaxes: the image, the region (the call's patch), the
   question the tool asks its VLM, and the object the program found that region by (the
   ``find``/``LOC`` box it overlaps most). One call made by several programs is one sub-task.
   Sub-tasks of held-out question types (``holdout_types``) are kept out of the distillation
   for the cross-task check.
2. ``teacher``: the Teacher Input Adapter shows each sub-task to the teacher as its ``view``
   (``pointer``: the whole image with the region drawn as a box, the visual pointer; or
   ``crop``: the region alone) and, with ``rewrite``, asks the sub-question about the named
   object (the visual pointer prompt: "What color is it?" about a ``circle`` -> "What color
   is the circle in the box?"). Batched greedy answers, written as they come
   (``<variant>/teacher.jsonl``: resumable, a kill -9 loses at most the batch in flight).
3. ``sft``: each usable answer becomes a chat record for the student in the format
   ``vpd rationalize`` writes, on exactly what the tool will show and ask it at run time
   (the region as the tool views it, the tool's question), with the answer as the op's
   result reads it (yes/no, the option, a short answer): ``<variant>/sft.jsonl``.
4. ``tune``: ``vpd tune`` trains the student (``student``: the tools' VLM, ``tiny`` by
   default) on it: ``<variant>/student/final``.
5. ``eval``: the held-out programs (``eval_samples`` on ``eval_questions``) are executed and
   verified (``vpd execute`` / ``vpd verify``) with the tools' VLM before distillation
   (``before``), with the student (``after``), and with the teacher as the tool (``teacher``,
   a ceiling, seeing the region as the teacher step showed it); program accuracy (per
   question: the mean score of its programs) overall and per question type, paired
   bootstrap intervals of each difference, and the cross-task check (``held_out``: accuracy
   on the held-out types must not drop beyond its interval). With ``ablation`` the other
   adapter (pointer vs crop without the pointer prompt, the paper's ablation) is distilled
   and evaluated too. Everything lands in ``DIR/sdvp.json``.

Every step resumes: the teacher and sft files follow the resume contract (StageOutput),
``vpd tune`` continues its checkpoints, ``vpd execute``/``vpd verify`` their outputs; a
rerun of a finished run does nothing new.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vpd.errors import VpdError
from vpd.evaluate import qtype_of
from vpd.execute import ExecuteConfig, run_execute
from vpd.metrics import paired_bootstrap
from vpd.progress import console, progress_bar
from vpd.rationalize import answer_record
from vpd.records import Execution, Question, SubTask, TeacherAnswer, ToolCall
from vpd.store import (
    RejectWriter,
    Shard,
    StageOutput,
    atomic_file,
    atomic_write_json,
    parse_shard,
    read_records,
)
from vpd.tools.backends.vlm import (
    VLM_OPS,
    match_option,
    options_of,
    question_for,
    view_image,
    yes_no,
)
from vpd.tools.protocol import Box
from vpd.tune import load_tune_config, run_tune
from vpd.tune.model import TINY, resolve_vlm
from vpd.verify import VerifyConfig, run_verify
from vpd.vlm import (
    ANSWER_SUFFIX,
    Generator,
    auto_dtype,
    clean_answer,
    load_model,
    model_digest,
    resolve_device,
    resolve_model,
    resolve_model_dir,
)

STEPS = ("collect", "teacher", "sft", "tune", "eval")
NAME_IOU = 0.5  # a region is "the <name>" when it overlaps a found box this much
TEACHER_VERSION = 1  # bump when the adapter's output changes, so old answers are not resumed

# ----------------------------------------------------------------------------- config


class SdvpConfig(BaseModel):
    """Every option of `vpd sdvp` (also the `sdvp:` section of a recipe)."""

    model_config = ConfigDict(extra="forbid")

    executions: Path
    questions: Path
    teacher: str = Field(min_length=1, description="Teacher VLM folder, hub id, or tiny.")
    out: Path
    student: str = Field("tiny", min_length=1, description="The tools' VLM to distill into.")
    ops: list[str] = Field(default_factory=lambda: list(VLM_OPS))
    view: Literal["pointer", "crop"] = "pointer"
    rewrite: bool = True  # the visual pointer prompt: name the object (and the box)
    ablation: bool = False  # also distil with the other adapter (the paper's ablation)
    tool_view: Literal["crop", "pointer"] = "crop"  # what the tool shows its VLM
    holdout_types: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, description="Distil at most N sub-tasks.")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tune_recipe: Path | None = None
    tune: dict[str, Any] = Field(default_factory=dict, description="vpd tune options.")
    eval_samples: Path | None = None
    eval_questions: Path | None = None
    backend: str = "synthetic"
    tools: dict[str, Any] = Field(default_factory=dict, description="Other tool options.")
    # Programs at once in the eval runs: their VLM calls reach the tool server together and
    # are answered in one batch, so more programs than cores keep the VLM's batches full.
    workers: int | None = Field(16, ge=1)
    timeout: float = Field(10.0, gt=0)
    bootstrap: int = Field(2000, ge=100)
    seed: int = 0
    until: Literal["collect", "teacher", "sft", "tune", "eval"] = "eval"
    # The teacher step split over machines: each answers its share of the sub-tasks (by id
    # hash) into <variant>/teacher.shard-I-of-N.jsonl; `vpd merge` joins them into
    # <variant>/teacher.jsonl, and a run without --shard goes on from there.
    shard: str | None = None
    force: bool = False
    progress: bool = True

    @field_validator("teacher", "student", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("ops", "holdout_types", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in VLM_OPS]
        if bad or not v:
            raise ValueError(f"ops must be some of {', '.join(VLM_OPS)}, got {v}")
        return sorted(set(v), key=VLM_OPS.index)

    @model_validator(mode="after")
    def _shard_only_teaches(self) -> SdvpConfig:
        if self.shard and self.until not in ("collect", "teacher"):
            raise ValueError(
                "--shard splits the teacher step only: run each shard with --until teacher, "
                "join them with vpd merge, then run without --shard"
            )
        return self

    @model_validator(mode="after")
    def _tune_options(self) -> SdvpConfig:
        # Typos in tune options fail here, before any teacher time is spent.
        taken = sorted({"init", "sft", "out"} & set(self.tune))
        if taken:
            raise ValueError(f"tune {', '.join(taken)} are set by sdvp itself (use --student)")
        load_tune_config(
            self.tune_recipe, None, **self.tune, sft=Path("sft.jsonl"), out=Path("student")
        )
        return self

    @field_validator("tools")
    @classmethod
    def _no_vqa(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"vqa", "vqa_ops", "vqa_view"} & set(v))
        if taken:
            raise ValueError(
                f"tool option(s) {taken} are set by sdvp itself (use --student, --ops, --tool-view)"
            )
        return v


@dataclass(frozen=True)
class Variant:
    """One Teacher Input Adapter setting, distilled into its own student."""

    view: str
    rewrite: bool

    @property
    def name(self) -> str:
        # pointer + prompt and crop as asked are the paper's two settings; others say so.
        if self.rewrite == (self.view == "pointer"):
            return self.view
        return f"{self.view}-{'named' if self.rewrite else 'asked'}"

    def describe(self) -> str:
        seen = "region drawn as a box on the image" if self.view == "pointer" else "region crop"
        asked = "question names the object" + (" in the box" if self.view == "pointer" else "")
        return f"{seen}; {asked if self.rewrite else 'question as the program asked it'}"


def variants(cfg: SdvpConfig) -> list[Variant]:
    main = Variant(cfg.view, cfg.rewrite)
    if not cfg.ablation:
        return [main]
    other = Variant("crop", False) if main.view == "pointer" else Variant("pointer", True)
    return [main, other]


# ----------------------------------------------------------------------------- sub-tasks


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box4(v: Any) -> list[float] | None:
    if (
        isinstance(v, list)
        and len(v) == 4
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ):
        return [float(x) for x in v]
    return None


def _result(call: ToolCall) -> Any:
    try:
        return json.loads(call.result)
    except (json.JSONDecodeError, TypeError):
        return None


def trace_subtasks(trace: list[ToolCall], ops: list[str]) -> list[tuple[str, dict, list, Any]]:
    """``(op, args, region, object name)`` of each call of ``ops`` in one trace.

    The object name is that of the ``find`` (ViperGPT ``find``, VisProg ``LOC``) whose box
    overlaps the call's patch most (IoU >= NAME_IOU); crops of a found box (VisProg's
    ``CROP``) keep its name. A patch that is the whole image names no object.
    """
    found: list[tuple[list[float], str]] = []
    out = []
    for call in trace:
        patch = _box4(call.args.get("patch"))
        if call.name == "find" and isinstance(call.args.get("name"), str):
            res = _result(call)
            for b in res if isinstance(res, list) else []:
                box = _box4(b)
                if box is not None:
                    found.append((box, call.args["name"]))
        elif call.name == "crop" and patch is not None:
            box = _box4(_result(call))
            name = _best_name(found, box) if box is not None else None
            if box is not None and name is not None:
                found.append((box, name))
        if call.name not in ops or patch is None:
            continue
        args = {k: v for k, v in call.args.items() if k != "patch"}
        whole = patch == [0.0, 0.0, 1.0, 1.0]
        out.append((call.name, args, patch, None if whole else _best_name(found, patch)))
    return out


def _best_name(found: list[tuple[list[float], str]], patch: list[float]) -> str | None:
    best, name = NAME_IOU, None
    for box, n in found:
        v = iou(box, patch)
        if v >= best:
            best, name = v, n
    return name


def subtask_id(image_key: str, op: str, args: dict[str, Any], region: list[float]) -> str:
    key = json.dumps([image_key, op, args, region], sort_keys=True)
    return "st-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def collect_subtasks(
    executions: Path,
    questions: Path,
    ops: list[str],
    holdout_types: list[str] | None = None,
    rejects: RejectWriter | None = None,
) -> list[SubTask]:
    """Every distinct VLM sub-task in the traces of ``executions`` (see :func:`trace_subtasks`).

    Sub-tasks come from programs of any status (a call made before an error is still a
    question the tool had to answer). A sub-task is held out when any question that asked
    it is of a held-out type, so nothing of those types leaks into the distillation.
    """
    qs = {q.id: q for q in read_records(questions, Question, rejects)}
    if not qs:
        raise VpdError(f"no valid questions in {questions}")
    base = Path(questions).resolve().parent
    held = set(holdout_types or [])
    subs: OrderedDict[str, SubTask] = OrderedDict()
    for ex in read_records(executions, Execution, rejects):
        q = qs.get(ex.qid)
        if q is None:
            if rejects is not None:
                rejects.write(0, f"question {ex.qid!r} not found in {questions}", ex.id, ex.id)
            continue
        image = Path(q.image) if Path(q.image).is_absolute() else base / q.image
        qtype = qtype_of(q)
        for op, args, region, name in trace_subtasks(ex.trace, ops):
            try:
                question = question_for(op, args)
            except Exception:  # noqa: BLE001 - a malformed call in a trace: not a sub-task
                continue
            sid = subtask_id(q.image, op, args, region)
            sub = subs.get(sid)
            if sub is None:
                sub = subs[sid] = SubTask(
                    id=sid,
                    image=str(image.resolve()),
                    op=op,
                    args=args,
                    region=region,
                    question=question,
                    object=name,
                )
            if sub.object is None and name is not None:
                sub.object = name
            if q.id not in sub.qids:
                sub.qids.append(q.id)
            if qtype not in sub.qtypes:
                sub.qtypes.append(qtype)
            sub.held_out = sub.held_out or qtype in held
    # By id: executions are written in the order programs finish, so file order is not
    # stable between runs; the id order is (and --limit takes an unbiased subset).
    return sorted(subs.values(), key=lambda s: s.id)


def write_subtasks(path: Path, subs: list[SubTask]) -> None:
    """The sub-task index, rewritten whole (it is derived from the inputs on every run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in subs:
            f.write(s.model_dump_json() + "\n")


# ----------------------------------------------------------------------------- adapter


def pixel_box(region: list[float], size: tuple[int, int]) -> Box:
    """A region in 0..1 (as traces store it) in the image's pixels (ViperGPT, y up)."""
    w, h = size
    left, lower, right, upper = region
    return (round(left * w), round(lower * h), round(right * w), round(upper * h))


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


class _Images:
    """The last few decoded images (a sub-task's image is often another's too)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, path: str) -> Image.Image:
        im = self._cache.get(path)
        if im is None:
            with Image.open(path) as f:
                im = f.convert("RGB")
            self._cache[path] = im
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return im


# ----------------------------------------------------------------------------- models


def model_path(name: str, tune: dict[str, Any] | None = None) -> str:
    """A VLM folder for ``name``; ``tiny`` is the embedded tiny VLM as ``vpd tune`` builds it."""
    if name == TINY:
        t = tune or {}
        return resolve_vlm(TINY, t.get("tiny_build"), t.get("tiny_lm_layers"))
    return resolve_model(name)


def _digest(path: str) -> str:
    return model_digest(resolve_model_dir(path))


# ----------------------------------------------------------------------------- steps


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
    dtype = auto_dtype(cfg.dtype, device)
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
            images = _Images()
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


def student_image(cfg: SdvpConfig, sub: SubTask, images: _Images) -> Path:
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
    images = _Images()
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


def tune_config(cfg: SdvpConfig, variant: Variant) -> Any:
    """The `vpd tune` config of one student (tune recipe < cfg.tune; the student is ``init``)."""
    return load_tune_config(
        cfg.tune_recipe,
        None,
        **cfg.tune,
        sft=cfg.out / variant.name / "sft.jsonl",
        out=cfg.out / variant.name / "student",
        init=cfg.student,
        force=cfg.force or None,
        progress=cfg.progress,
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate_tools(cfg: SdvpConfig, name: str, vqa: str, view: str) -> dict[str, list[float]]:
    """Execute + verify the held-out programs with ``vqa`` as the tools' VLM; per question,
    the scores of its programs (a program that failed scores 0)."""
    assert cfg.eval_samples is not None and cfg.eval_questions is not None
    folder = cfg.out / "eval" / name
    tools = {**cfg.tools, "vqa": vqa, "vqa_ops": ",".join(cfg.ops), "vqa_view": view}
    if cfg.device != "auto":
        tools.setdefault("device", cfg.device)
    run_execute(
        ExecuteConfig(
            samples=cfg.eval_samples,
            questions=cfg.eval_questions,
            out=folder / "executions.jsonl",
            backend=cfg.backend,
            tools=tools,
            timeout=cfg.timeout,
            workers=cfg.workers,
            force=cfg.force,
            progress=cfg.progress,
        )
    )
    run_verify(
        VerifyConfig(
            executions=folder / "executions.jsonl",
            samples=cfg.eval_samples,
            questions=cfg.eval_questions,
            out=folder / "verified.jsonl",
            policy="all",
            force=cfg.force,
            progress=False,
        )
    )
    scores: dict[str, list[float]] = {}
    with open(folder / "verified.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                v = json.loads(line)
                scores.setdefault(v["qid"], []).append(float(v.get("score") or 0.0))
    return scores


def _acc(per_q: dict[str, float], qids: list[str]) -> float | None:
    return round(sum(per_q[q] for q in qids) / len(qids), 4) if qids else None


def accuracy_table(
    per_q: dict[str, float], qtypes: dict[str, str], qids: list[str]
) -> dict[str, Any]:
    """Program accuracy over ``qids``, overall and per question type."""
    types: dict[str, list[str]] = {}
    for q in qids:
        types.setdefault(qtypes[q], []).append(q)
    return {
        "accuracy": _acc(per_q, qids),
        "n": len(qids),
        "per_type": {
            t: {"accuracy": _acc(per_q, ids), "n": len(ids)} for t, ids in sorted(types.items())
        },
    }


def _interval(r: dict[str, Any]) -> list[float]:
    return [round(r["lo"], 4), round(r["hi"], 4)] if r["n"] else [0.0, 0.0]


def compare(
    base: dict[str, float], other: dict[str, float], qids: list[str], cfg: SdvpConfig
) -> dict[str, Any]:
    """Paired difference other - base over ``qids`` with its bootstrap interval."""
    a = [base[q] for q in qids]
    b = [other[q] for q in qids]
    diff = round((sum(b) - sum(a)) / len(qids), 4) if qids else None
    return {
        "n": len(qids),
        "diff": diff,
        "ci95": _interval(paired_bootstrap(b, a, n_boot=cfg.bootstrap, seed=cfg.seed)),
    }


def build_report(
    cfg: SdvpConfig,
    conditions: dict[str, dict[str, float]],
    qtypes: dict[str, str],
    main: str,
) -> dict[str, Any]:
    """before / after / teacher / held_out (+ ablation variants) from per-question scores."""
    qids = sorted(set.intersection(*(set(c) for c in conditions.values())))
    held = set(cfg.holdout_types)
    held_q = [q for q in qids if qtypes[q] in held]
    seen_q = [q for q in qids if qtypes[q] not in held]
    before = conditions["before"]
    rep: dict[str, Any] = {"questions": len(qids)}
    for name, per_q in conditions.items():
        key = "after" if name == main else name
        entry = accuracy_table(per_q, qtypes, qids)
        if name != "before":
            entry["vs_before"] = compare(before, per_q, qids, cfg)
        if name not in ("before", "teacher", main):
            entry["vs_after"] = compare(conditions[main], per_q, qids, cfg)
            rep.setdefault("ablation", {})[name] = entry
            continue
        rep[key] = entry
    after = conditions[main]
    if seen_q:
        rep["distilled_types"] = {
            "types": sorted({qtypes[q] for q in seen_q}),
            "before": _acc(before, seen_q),
            "after": _acc(after, seen_q),
            **compare(before, after, seen_q, cfg),
        }
    if held:
        check: dict[str, Any] = {"types": sorted(held), "n": len(held_q)}
        if held_q:
            cmp = compare(before, after, held_q, cfg)
            check.update(before=_acc(before, held_q), after=_acc(after, held_q), **cmp)
            # "Must not drop beyond its interval": the drop is within noise when the 95%
            # interval of after - before still reaches 0.
            check["ok"] = cmp["ci95"][1] >= 0
        else:
            check["ok"] = None
            check["note"] = "no held-out question of these types among the eval questions"
        rep["held_out"] = check
    return rep


# ----------------------------------------------------------------------------- stage


def report_path(out: Path) -> Path:
    return Path(out) / "sdvp.json"


def _check_inputs(cfg: SdvpConfig) -> None:
    for flag, p in (("EXECUTIONS", cfg.executions), ("--questions", cfg.questions)):
        if not Path(p).is_file():
            raise VpdError(f"{flag} file not found: {p}")
    if (cfg.eval_samples is None) != (cfg.eval_questions is None):
        raise VpdError("--eval-samples and --eval-questions go together (held-out programs)")
    for flag, p in (("--eval-samples", cfg.eval_samples), ("--eval-questions", cfg.eval_questions)):
        if p is not None and not Path(p).is_file():
            raise VpdError(f"{flag} file not found: {p}")
    if cfg.tune_recipe is not None and not Path(cfg.tune_recipe).is_file():
        raise VpdError(f"--tune-recipe not found: {cfg.tune_recipe}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise VpdError(f"--out must be a folder, got a file: {cfg.out}")
    parse_shard(cfg.shard)  # a bad --shard fails before any work


def run_sdvp(cfg: SdvpConfig) -> dict[str, Any]:
    """Run (or resume) SDVP up to ``cfg.until``; returns (and writes) the report."""
    t0 = time.time()
    _check_inputs(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    todo = STEPS[: STEPS.index(cfg.until) + 1]
    rep: dict[str, Any] = {
        "teacher_model": cfg.teacher,
        "student_model": cfg.student,
        "ops": cfg.ops,
        "tool_view": cfg.tool_view,
        "holdout_types": cfg.holdout_types,
        "variants": {},
    }

    # 1. sub-tasks
    with RejectWriter(cfg.out / "subtasks.rejects.jsonl") as rejects:
        subs = collect_subtasks(cfg.executions, cfg.questions, cfg.ops, cfg.holdout_types, rejects)
        if cfg.holdout_types:
            known = {t for s in subs for t in s.qtypes} | _question_types(cfg.questions)
            unknown = sorted(set(cfg.holdout_types) - known)
            if unknown:
                raise VpdError(
                    f"--holdout-types {', '.join(unknown)}: no such question type in "
                    f"{cfg.questions} (types: {', '.join(sorted(known))})"
                )
    write_subtasks(cfg.out / "subtasks.jsonl", subs)
    distil = [s for s in subs if not s.held_out]
    if cfg.limit is not None:
        distil = distil[: cfg.limit]
    rep["subtasks"] = {
        "rejected_input_lines": rejects.count,
        "total": len(subs),
        "distilled": len(distil),
        "held_out": sum(s.held_out for s in subs),
        "per_op": dict(Counter(s.op for s in distil)),
        "named_object": sum(s.object is not None for s in distil),
    }
    if not distil:
        raise VpdError(
            f"no VLM sub-task to distil in {cfg.executions}: its programs never called "
            f"{', '.join(cfg.ops)}" + (" outside the held-out types" if subs else "")
        )
    if cfg.progress:
        console().print(
            f"sdvp: {len(subs)} sub-tasks ({rep['subtasks']['held_out']} held out), "
            f"{len(distil)} to distil: {rep['subtasks']['per_op']}"
        )

    # 2-4. per adapter variant: teacher -> sft -> tune
    teacher = cfg.teacher
    if "teacher" in todo:
        # ``tiny`` as the teacher is the tiny VLM the students start from (their tune options).
        tiny = tune_config(cfg, variants(cfg)[0]).model_dump() if teacher == TINY else None
        teacher = model_path(teacher, tiny)
    for v in variants(cfg):
        vr: dict[str, Any] = {"view": v.view, "rewrite": v.rewrite, "adapter": v.describe()}
        rep["variants"][v.name] = vr
        if "teacher" in todo:
            vr["teacher"] = run_teacher(cfg, v, distil, teacher)
        if "sft" in todo:
            vr["sft"] = write_student_sft(cfg, v, distil)
            if vr["sft"]["records"] == 0:
                raise VpdError(
                    f"the teacher gave no usable answer ({vr['sft']['skipped']}); see "
                    f"{cfg.out / v.name / 'teacher.jsonl'}"
                )
        if "tune" in todo:
            summary = run_tune(tune_config(cfg, v))
            vr["tune"] = {k: summary.get(k) for k in ("steps", "train_loss", "wall_s", "skipped")}

    # 5. held-out programs with each tool VLM
    if "eval" in todo and cfg.eval_samples is not None:
        tcfg = tune_config(cfg, variants(cfg)[0])
        student0 = model_path(cfg.student, tcfg.model_dump())
        conds = {"before": (student0, cfg.tool_view), "teacher": (teacher, cfg.view)}
        for v in variants(cfg):
            conds[v.name] = (str(cfg.out / v.name / "student" / "final"), cfg.tool_view)
        scores = {}
        for name, (vqa, view) in conds.items():
            if cfg.progress:
                console().rule(f"sdvp eval: {name} tools")
            per = evaluate_tools(cfg, name, vqa, view)
            scores[name] = {q: sum(s) / len(s) for q, s in per.items()}
        qtypes = {q.id: qtype_of(q) for q in read_records(cfg.eval_questions, Question)}
        rep.update(build_report(cfg, scores, qtypes, variants(cfg)[0].name))
    elif "eval" in todo:
        rep["note"] = "no held-out programs given (--eval-samples/--eval-questions): no accuracy"
    rep["wall_s"] = round(time.time() - t0, 2)
    atomic_write_json(report_path(cfg.out), rep, indent=2, default=str)
    return rep


def _question_types(path: Path) -> set[str]:
    return {qtype_of(q) for q in read_records(path, Question)}


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _diff_text(c: dict[str, Any] | None) -> str:
    if not c or c.get("diff") is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{100 * c['diff']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def result_table(rep: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(columns, rows, notes) of the accuracy table: one row per question type and "all",
    one column per tools' VLM (before / after / teacher / ablation variants); the notes
    give each difference with its interval and the cross-task check."""
    cols = [c for c in ("before", "after", "teacher") if c in rep]
    cols += list(rep.get("ablation") or {})
    if not cols:
        return [], [], [rep.get("note", "no evaluation")]

    def entry(c: str) -> dict[str, Any]:
        return rep[c] if c in rep else rep["ablation"][c]

    held = set(rep.get("holdout_types") or [])
    rows = []
    for t in sorted({t for c in cols for t in entry(c).get("per_type", {})}):
        per = entry(cols[0])["per_type"].get(t, {})
        row = [f"{t} (held out)" if t in held else t, str(per.get("n", ""))]
        rows.append(row + [_pct(entry(c)["per_type"].get(t, {}).get("accuracy")) for c in cols])
    rows.append(["all", str(entry(cols[0])["n"])] + [_pct(entry(c)["accuracy"]) for c in cols])
    notes = [
        f"{c} - before: {_diff_text(entry(c).get('vs_before'))} (95% paired bootstrap)"
        for c in cols[1:]
    ]
    ho = rep.get("held_out")
    if ho:
        verdict = {True: "ok", False: "DROPPED", None: "not measured"}[ho.get("ok")]
        notes.append(
            f"cross-task check on {', '.join(ho['types'])} (n={ho['n']}): "
            f"{_pct(ho.get('before'))} -> {_pct(ho.get('after'))}, {_diff_text(ho)}: {verdict}"
        )
    return ["question type", "n", *cols], rows, notes


def print_report(rep: dict[str, Any]) -> None:
    """The accuracy table and the checks (see :func:`result_table`), to stderr."""
    from rich.table import Table

    cols, rows, notes = result_table(rep)
    con = console()
    if cols:
        table = Table(title="SDVP: program accuracy on held-out questions, by the tools' VLM")
        for i, c in enumerate(cols):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in rows[:-1]:
            table.add_row(*row)
        table.add_section()
        table.add_row(*rows[-1])
        con.print(table)
    for n in notes:
        con.print(n)


def markdown_report(rep: dict[str, Any]) -> list[str]:
    """The same table and notes as Markdown lines (the run report's SDVP section)."""
    cols, rows, notes = result_table(rep)
    lines = []
    sub = rep.get("subtasks") or {}
    if sub:
        lines += [
            f"Teacher `{rep.get('teacher_model')}` distilled into the tools' VLM "
            f"`{rep.get('student_model')}` on {sub.get('distilled')} sub-tasks "
            f"({sub.get('per_op')}); {sub.get('held_out')} sub-tasks of held-out types "
            "left out.",
            "",
        ]
    for name, v in (rep.get("variants") or {}).items():
        s = v.get("sft") or {}
        lines.append(f"- `{name}`: {v.get('adapter')}; {s.get('records', '-')} student records")
    if lines and lines[-1]:
        lines.append("")
    if cols:
        lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[:-1]]
        last = rows[-1]
        lines.append("| **all** | " + " | ".join(last[1:]) + " |")
        lines.append("")
    lines += [f"- {n}" for n in notes]
    return lines
