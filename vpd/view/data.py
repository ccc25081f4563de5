"""What `vpd view` shows: each question joined with its programs, rationales and arms' answers.

Reads the stage files as they are (questions, verified or executed programs, SFT records,
predictions) and builds two things:

- one record per question (``QuestionView``-shaped dicts, see :func:`build_site_data`): the
  question, its image(s) as URLs relative to the site folder, every program with its
  status, answer, score, verdict and trace, the rationales, each arm's answer;
- the index: the same questions as columns (id, text, type, dataset, split, program
  counts, statuses, kept, rationales, each arm right/wrong), compact enough that the index
  page loads 100k questions at once and filters them in plain JS.

Question records are split into shards by a hash of the question id (:func:`shard_of`,
FNV-1a, computed the same way in ``static/common.js``), so a question page loads one small
``<script src>`` file by its id alone: pages open from disk (file://), where fetch() of a
local file is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vpd.errors import VpdError
from vpd.evaluate import qtype_of
from vpd.images import resolve_image
from vpd.records import (
    STATUSES,
    Execution,
    Prediction,
    Question,
    Sft,
    Verified,
    split_sample_id,
)
from vpd.runpaths import ARMS, RunPaths, saved_recipe, writer_rounds
from vpd.store import read_records

QUESTIONS_PER_SHARD = 100  # a question page loads ~100 questions' data: small, few files
RIGHT_AT = 0.5  # an arm's answer counts as right at this score (VQA's 2-of-3 annotators too)


@dataclass
class ViewInputs:
    """The files a site is built from (every one but the questions optional)."""

    questions: list[Path]
    verified: Path | None = None
    # Programs without a verdict, by source: "execute" (no verify yet), "programs" (the
    # programs arm's one greedy program per test question).
    executions: dict[str, Path] = field(default_factory=dict)
    sft: Path | None = None
    preds: dict[str, Path] = field(default_factory=dict)  # arm -> predictions JSONL
    report_md: Path | None = None  # rendered as the first page, its plots copied
    title: str = ""


@dataclass
class SiteData:
    """Per-question records and the index's columns, ready to be written as JS."""

    questions: list[dict[str, Any]]
    index: dict[str, Any]
    arms: list[str]
    skipped: dict[str, int]  # input label -> bad lines left out (with reasons counted)


class _CountRejects:
    """Counts bad input lines instead of writing a rejects file into someone's run dir."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def write(self, line: int, reason: str, raw: str, rid: str | None = None) -> None:
        self.count += 1
        self.first = self.first or f"line {line}: {reason}"


def run_inputs(run_dir: Path) -> ViewInputs:
    """The files of a `vpd run` directory that the view shows (those that exist)."""
    p = RunPaths(Path(run_dir))
    questions = [f for f in (p.train, p.val, p.test) if f.exists()]
    if not questions:
        raise VpdError(f"{run_dir}: no questions (data/train.jsonl, data/test.jsonl); is it a run?")
    preds: dict[str, Path] = {}
    eval_dir = p.root / "eval"
    if eval_dir.is_dir():
        # The arms in report order, each arm's other seeds after it (vpd, vpd-seed1...).
        def order(f: Path) -> tuple[int, str]:
            base = f.stem.split("-seed")[0]
            return (ARMS.index(base) if base in ARMS else len(ARMS), f.stem)

        for f in sorted(eval_dir.glob("*.jsonl"), key=order):
            preds[f.stem] = f
    if (p.programs / "preds.jsonl").exists():
        preds["programs"] = p.programs / "preds.jsonl"
    report = p.root / "report.md"
    # With writer rounds, the programs rationalize distilled are the last round's.
    _, executions, verified = p.final_programs(writer_rounds(saved_recipe(p)))
    return ViewInputs(
        questions=questions,
        verified=verified if verified.exists() else None,
        executions={
            src: f
            for src, f in (
                ("execute", None if verified.exists() else executions),
                ("programs", p.programs / "executions.jsonl"),
            )
            if f is not None and f.exists()
        },
        sft=p.sft if p.sft.exists() else None,
        preds=preds,
        report_md=report if report.exists() else None,
        title=p.root.resolve().name,
    )


def fnv1a(text: str) -> int:
    """32-bit FNV-1a of the UTF-8 bytes (the JS side computes the same)."""
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def shard_count(n_questions: int) -> int:
    return max(1, -(-n_questions // QUESTIONS_PER_SHARD))


def shard_of(qid: str, n_shards: int) -> int:
    return fnv1a(qid) % n_shards


def _read(path: Path, model: type[Any], skipped: dict[str, int], label: str) -> Iterable[Any]:
    rej = _CountRejects()
    yield from read_records(path, model, rej, allow_empty=True)
    if rej.count:
        skipped[f"{label} {path}"] = rej.count


def _image_url(path: Path, site: Path, copy: bool) -> str:
    """The image's URL in the site: ``img/<hash>-<name>``, a relative symbolic link to it
    (``copy``: a copy, for a site that travels without the run). Inside the site folder
    the page finds it from disk and the ``--serve`` server can serve it (a server shows
    nothing above its folder)."""
    path = Path(os.path.abspath(path))
    # Named by a hash of the full path: two folders may both hold "0001.png".
    dest = site / "img" / f"{fnv1a(str(path)):08x}-{path.name}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            if dest.is_symlink():  # linked by an earlier build: never copy through it
                dest.unlink()
            if not dest.exists() and path.exists():
                shutil.copyfile(path, dest)
        elif not os.path.lexists(dest):
            os.symlink(os.path.relpath(path, dest.parent), dest)
        return quote(dest.relative_to(site).as_posix())
    except (OSError, ValueError):
        # No symbolic links here (Windows without the right) or another drive: the image
        # where it is, as a relative URL (from disk) or an absolute file URL.
        try:
            return quote(Path(os.path.relpath(path, site.resolve())).as_posix())
        except ValueError:
            return path.as_uri()


def _rationale_text(rec: Sft) -> str:
    """The assistant's last turn, text parts joined."""
    for msg in reversed(rec.messages):
        if msg.get("role") == "assistant":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            return " ".join(
                str(c.get("text", "")) for c in content or [] if c.get("type") == "text"
            ).strip()
    return ""


def _is_box(v: Any) -> bool:
    # type() not isinstance: a bool is no coordinate (and this runs per traced call)
    return type(v) is list and len(v) == 4 and all(type(x) in (int, float) for x in v)


def call_boxes(call: dict[str, Any]) -> list[list[float]] | None:
    """The boxes a traced call returned ([l, lo, r, up] in 0..1, y from the image bottom,
    as the tool server writes them), or None when the call does not return boxes. ``find``
    returns a list (maybe empty; past 8 boxes the trace keeps a "+N more" string, not
    drawn), ``crop`` one box."""
    try:
        res = json.loads(call.get("result") or "")
    except (json.JSONDecodeError, TypeError):
        return None
    if _is_box(res):
        return [[float(x) for x in res]]
    if call.get("name") == "find" and isinstance(res, list):
        return [[float(x) for x in b] for b in res if _is_box(b)]
    return None


def _trace(calls: list[Any]) -> list[dict[str, Any]]:
    out = []
    for t in calls:
        d = t.model_dump()
        boxes = call_boxes(d)
        if boxes is not None:
            d["boxes"] = boxes
        out.append(d)
    return out


def _program(rec: Execution | Verified, src: str) -> dict[str, Any]:
    k = getattr(rec, "k", None)
    if k is None and "#" in rec.id:
        try:
            k = split_sample_id(rec.id)[1]
        except ValueError:
            k = None
    out: dict[str, Any] = {
        "id": rec.id,
        "k": k,
        "src": src,
        "status": getattr(rec, "status", None) or ("ok" if rec.answer is not None else None),
        "answer": rec.answer,
        "program": getattr(rec, "program", "") or "",
        "trace": _trace(rec.trace),
    }
    if isinstance(rec, Verified):
        out.update(score=rec.score, kept=rec.kept, reason=rec.reason)
    else:
        out.update(error=rec.error)
    return out


def build_site_data(inputs: ViewInputs, site: Path, *, copy_images: bool = False) -> SiteData:
    """Join the inputs by question id (see the module docstring for what comes out)."""
    skipped: dict[str, int] = {}
    qs: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    urls: dict[Path, str] = {}  # questions share images (5 per synthetic scene)

    def image_url(path: Path) -> str:
        if path not in urls:
            urls[path] = _image_url(path, site, copy_images)
        return urls[path]

    for qfile in inputs.questions:
        for q in _read(qfile, Question, skipped, "questions"):
            if q.id in by_id:  # the same question in two files: the first wins
                continue
            rec = {
                "id": q.id,
                "question": q.question,
                "answers": q.answers,
                "type": qtype_of(q),
                "dataset": q.dataset,
                "split": q.split or qfile.stem,
                "images": [image_url(resolve_image(n, qfile.parent)) for n in q.all_images()],
                "programs": [],
                "rationales": [],
                "arms": {},
            }
            by_id[q.id] = rec
            qs.append(rec)
    if not qs:
        raise VpdError("no questions to show: the questions files hold no valid record")

    orphans = 0  # records of questions not in the questions files
    seen_programs: set[str] = set()
    sources: list[tuple[Path, type[Any], str]] = []
    if inputs.verified is not None:
        sources.append((inputs.verified, Verified, "verify"))
    for src, ex in inputs.executions.items():
        sources.append((ex, Execution, src))
    for path, model, src in sources:
        for r in _read(path, model, skipped, "programs"):
            q = by_id.get(r.qid)
            key = f"{src}:{r.id}"
            if q is None:
                orphans += 1
            elif key not in seen_programs:
                seen_programs.add(key)
                q["programs"].append(_program(r, src))
    for q in qs:
        q["programs"].sort(
            key=lambda p: (p["src"] != "verify", p["k"] if p["k"] is not None else 0)
        )

    if inputs.sft is not None:
        for r in _read(inputs.sft, Sft, skipped, "sft"):
            if r.task != "rationale":
                continue
            extra = r.model_extra or {}
            qid = extra.get("qid") or r.id.split("/", 1)[0]
            q = by_id.get(qid)
            if q is None:
                orphans += 1
                continue
            q["rationales"].append(
                {
                    "id": r.id,
                    "source": "sft",
                    "sample": extra.get("sample"),
                    "text": _rationale_text(r),
                }
            )

    for arm, path in inputs.preds.items():
        for r in _read(path, Prediction, skipped, f"preds ({arm})"):
            q = by_id.get(r.qid or r.id)
            if q is None:
                orphans += 1
                continue
            extra = r.model_extra or {}
            q["arms"][arm] = {"prediction": r.prediction, "score": r.score}
            if extra.get("rationale"):
                q["rationales"].append(
                    {
                        "id": f"{q['id']}/{arm}",
                        "source": f"arm:{arm}",
                        "text": str(extra["rationale"]),
                        "answer": extra.get("rationale_answer"),
                    }
                )
    if orphans:
        skipped["records of questions not in the questions files"] = orphans

    # Neighbours in index order, so a question page walks the set (and the rating queue,
    # the questions with a rationale) without loading the index.
    next_rated = None
    for i in range(len(qs) - 1, -1, -1):
        q = qs[i]
        q["prev"] = qs[i - 1]["id"] if i > 0 else None
        q["next"] = qs[i + 1]["id"] if i + 1 < len(qs) else None
        q["next_rate"] = next_rated
        if q["rationales"]:
            next_rated = q["id"]
    arms = list(inputs.preds)
    return SiteData(questions=qs, index=build_index(qs, arms), arms=arms, skipped=skipped)


def _codes(values: list[str]) -> tuple[list[str], list[int]]:
    names = sorted(set(values))
    pos = {v: i for i, v in enumerate(names)}
    return names, [pos[v] for v in values]


def build_index(qs: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """The index page's columns (one list per field, categorical fields as codes)."""
    types, type_codes = _codes([q["type"] for q in qs])
    datasets, ds_codes = _codes([q["dataset"] for q in qs])
    splits, split_codes = _codes([q["split"] for q in qs])
    status_bits = []
    for q in qs:
        bits = 0
        for p in q["programs"]:
            if p["status"] in STATUSES:
                bits |= 1 << STATUSES.index(p["status"])
        status_bits.append(bits)
    arm_cols = {}
    for arm in arms:
        # One character per question: 1 right, 0 wrong, "." not answered or unscored.
        chars = []
        for q in qs:
            a = q["arms"].get(arm)
            s = a.get("score") if a else None
            chars.append("." if s is None else ("1" if s >= RIGHT_AT else "0"))
        arm_cols[arm] = "".join(chars)
    return {
        "n": len(qs),
        "types": types,
        "datasets": datasets,
        "splits": splits,
        "statuses": list(STATUSES),
        "arms": arms,
        "id": [q["id"] for q in qs],
        "text": [q["question"] for q in qs],
        "type": type_codes,
        "dataset": ds_codes,
        "split": split_codes,
        "nprog": [len(q["programs"]) for q in qs],
        "nkept": [sum(1 for p in q["programs"] if p.get("kept")) for q in qs],
        "status": status_bits,
        "nrat": [len(q["rationales"]) for q in qs],
        "arm": arm_cols,
    }
