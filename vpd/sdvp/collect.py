"""The collect step: the VLM sub-tasks of executed programs.

The sub-tasks of the chosen ops (``simple_query``, ``verify_property``, ``best_text_match``;
VisProg's ``VQA`` step is a ``simple_query``) are read from the execution traces of both
program syntaxes: the image, the region (the call's patch), the question the tool asks its
VLM, and the object the program found that region by (the ``find``/``LOC`` box it overlaps
most). One call made by several programs is one sub-task. Sub-tasks of held-out question
types (``holdout_types``) are kept out of the distillation for the cross-task check.
``OUT/subtasks.jsonl`` is the index, rewritten whole on every run (it is derived).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.evaluate import qtype_of
from vpd.images import resolve_image
from vpd.progress import console
from vpd.records import Execution, Question, SubTask, ToolCall
from vpd.sdvp.config import SdvpRun
from vpd.store import RejectWriter, atomic_file, read_records
from vpd.tools.backends.vlm import question_for

NAME_IOU = 0.5  # a region is "the <name>" when it overlaps a found box this much


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
        image = resolve_image(q.image, base)
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


def subtasks_path(out: Path) -> Path:
    return Path(out) / "subtasks.jsonl"


def collect_step(run: SdvpRun) -> None:
    """Collect, index and choose the sub-tasks to distil; ``report["subtasks"]``."""
    cfg = run.cfg
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
    write_subtasks(subtasks_path(cfg.out), subs)
    distil = [s for s in subs if not s.held_out]
    if cfg.limit is not None:
        distil = distil[: cfg.limit]
    summary = {
        "rejected_input_lines": rejects.count,
        "total": len(subs),
        "distilled": len(distil),
        "held_out": sum(s.held_out for s in subs),
        "per_op": dict(Counter(s.op for s in distil)),
        "named_object": sum(s.object is not None for s in distil),
    }
    run.report["subtasks"] = summary
    if not distil:
        raise VpdError(
            f"no VLM sub-task to distil in {cfg.executions}: its programs never called "
            f"{', '.join(cfg.ops)}" + (" outside the held-out types" if subs else "")
        )
    if cfg.progress:
        console().print(
            f"sdvp: {len(subs)} sub-tasks ({summary['held_out']} held out), "
            f"{len(distil)} to distil: {summary['per_op']}"
        )
    run.subtasks, run.distil = subs, distil


def _question_types(path: Path) -> set[str]:
    return {qtype_of(q) for q in read_records(path, Question)}
