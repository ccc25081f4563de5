"""`vpd rationalize`: kept program + execution trace -> chain-of-thought SFT records.

As in VPD (Hu et al., CVPR 2024, Sec. 3.2), a rationale describes the program's
steps grounded in what the vision tools returned (boxes as normalized
``[left, lower, right, upper]``, y from the image bottom) and ends with
"So the answer is X." Two modes:

- ``template``: deterministic, no LLM; walks the trace with one phrasing per op.
- ``llm``: an LLM rewrites program + trace into fluent text (prompt in
  ``prompts/rationale/<version>/``); a rationale whose last sentence does not state
  the verified answer is retried, then replaced by the template one (counted).

Each kept question yields two ``Sft`` records, as in VPD's training mix: task
``answer`` (``<qid>/answer``: short answer) and task ``rationale``
(``<qid>/rationale``; with ``per_question > 1``: ``<qid>/rationale/<k>``, k the
sample index). ``Sft.image`` is relative to the OUTPUT file's folder (absolute when
no relative path exists, e.g. another drive), so the tuner resolves it against
``Path(sft_file).parent``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.images import ImageChecks
from vpd.llm import GenParams, make_llm_from_spec
from vpd.metrics import metric_family, normalize_answer, resolve_metric, to_number, to_yesno
from vpd.options import force_field, progress_field, shard_field
from vpd.progress import progress_bar
from vpd.records import Question, Sft, ToolCall, Verified, split_sample_id
from vpd.resources import prompts_dir
from vpd.store import LabelledRejects, StageOutput, load_at, parse_shard, read_records, scan_jsonl
from vpd.vlm import ANSWER_SUFFIX, RATIONALE_SUFFIX

PROMPTS_DIR = prompts_dir() / "rationale"

# ----------------------------------------------------------------------------- formatting


def canonical_answer(answer: Any, question: Question) -> str:
    """The answer as the VLM should say it: yes/no for booleans, "3" not "3.0"."""
    text = str(answer).strip()
    metric = metric_family(resolve_metric(question))  # POPE/NLVR2 answer yes/no too
    if metric == "yesno":
        return to_yesno(text) or text
    if metric in ("count", "vqa", "exact"):
        # Count answers may be words ("three"); elsewhere only numerals are rewritten.
        numeric = metric == "count" or re.fullmatch(r"-?\d+(\.\d+)?", text)
        num = to_number(text) if numeric else None
        if num is not None and num.is_integer():
            return str(int(num))
    return text


def _num(x: float) -> str:
    return f"{x:.2f}"


def _is_box(x: Any) -> bool:
    return (
        isinstance(x, list | tuple)
        and len(x) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
    )


def fmt_box(box: Any) -> str:
    """``[0.12, 0.30, 0.25, 0.43]``: normalized [left, lower, right, upper], 2 decimals."""
    if isinstance(box, dict):
        keys = ("left", "lower", "right", "upper")
        if all(k in box for k in keys):
            box = [box[k] for k in keys]
        elif "box" in box:
            box = box["box"]
    if _is_box(box):
        return "[" + ", ".join(_num(float(v)) for v in box) + "]"
    return str(box)


def fmt_value(v: Any) -> str:
    """A tool result in words: booleans as yes/no, boxes as coordinates, floats rounded."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _num(v)
    if v is None:
        return "nothing"
    if _is_box(v) or (isinstance(v, dict) and ("box" in v or "left" in v)):
        return fmt_box(v)
    if isinstance(v, list):
        return _join([fmt_value(x) for x in v]) if v else "nothing"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt_value(x)}" for k, x in v.items())
    return str(v)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _arg(args: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in args and args[n] is not None:
            return args[n]
    return None


def _a(name: Any) -> str:
    """ "star" -> "a star", "apple" -> "an apple"; plurals and determined phrases kept."""
    text = str(name).strip()
    first = text.split(" ", 1)[0].lower()
    if not text or first in ("a", "an", "the", "any", "some", "this", "that") or first.isdigit():
        return text
    if text.endswith("s") and not text.endswith("ss"):
        return text  # plural: "red circles"
    return ("an " if text[0].lower() in "aeiou" else "a ") + text


def _region(args: dict[str, Any]) -> str:
    """ " in the region [..]" unless the call was on the whole image."""
    patch = args.get("patch")
    if not _is_box(patch) or [round(float(v), 2) for v in patch] == [0, 0, 1, 1]:
        return ""
    return f" in the region {fmt_box(patch)}"


def describe_call(call: ToolCall) -> str:
    """One sentence for one traced tool call, grounded in its result."""
    a = call.args
    res = call.value()
    where = _region(a)
    name = _arg(a, "name", "object_name", "object", "obj")
    if name is None:  # an arg name we do not know: the first text argument is the object
        name = next((v for k, v in a.items() if k != "patch" and isinstance(v, str)), "it")
    op = call.name
    if op == "find":
        if not isinstance(res, list):  # an error or a summary we do not know: say it as is
            return f"I look for {_a(name)}{where}: {fmt_value(res)}."
        boxes = [b for b in res if _is_box(b) or isinstance(b, dict)]
        rest = [x for x in res if not (_is_box(x) or isinstance(x, dict))]  # e.g. "+5 more"
        if not boxes and not rest:
            return f"I look for {_a(name)}{where} and find none."
        n = len(boxes)
        what = "one" if n == 1 else str(n)
        at = _join([fmt_box(b) for b in boxes] + [str(x) for x in rest])
        return f"I look for {_a(name)}{where} and find {what} at {at}."
    if op == "exists":
        return f"I check whether there is {_a(name)}{where}: {fmt_value(res)}."
    if op == "verify_property":
        prop = _arg(a, "prop", "property", "attribute", "value")
        return f"I check whether the {name}{where} is {prop}: {fmt_value(res)}."
    if op == "simple_query":
        q = _arg(a, "question", "query", "text")
        return f'I ask "{q}"{where}, and the answer is "{fmt_value(res)}".'
    if op == "best_text_match":
        opts = _arg(a, "options", "option_list", "choices") or []
        target = where.replace(" in the region", " for the region") or " for the image"
        return f"Among {_join([str(o) for o in opts])}, the best match{target} is {fmt_value(res)}."
    if op == "compute_depth":
        return f"I estimate the depth{where or ' of the image'}: {fmt_value(res)}."
    if op == "crop":
        return f"I zoom into the region {fmt_box(res) if res not in (None, '') else where}."
    if op == "overlaps_with":
        other = [a.get(k) for k in ("left", "lower", "right", "upper")]
        # Only normalized coordinates are shown; pixel args would mix two scales.
        normalized = _is_box(other) and all(0 <= float(v) <= 1 for v in other)
        other_s = fmt_box(other) if normalized else "the other region"
        return f"I check whether the region{where or ' (whole image)'} overlaps {other_s}: " + (
            f"{fmt_value(res)}."
        )
    if op == "llm_query":
        q = _arg(a, "question", "query", "text")
        return f'From general knowledge, "{q}": {fmt_value(res)}.'
    if op in ("best_image_match", "distance"):
        return f"I compute {op.replace('_', ' ')}{where}: {fmt_value(res)}."
    shown = {k: v for k, v in a.items() if k != "patch"}
    arg_s = ", ".join(f"{k}={fmt_value(v)}" for k, v in shown.items())
    return f"I call {op}({arg_s}){where} and get {fmt_value(res)}."


# Bookkeeping calls (image size) that say nothing about the image's content.
_UNTOLD_OPS = frozenset({"size"})


def template_rationale(trace: list[ToolCall], answer: str, max_steps: int = 40) -> str:
    """Deterministic rationale: one grounded sentence per distinct tool call, then the answer.

    Repeated identical calls (a program re-asking a cached question) are told once;
    beyond ``max_steps`` sentences the rest is summarized as a count.
    """
    seen: set[tuple[str, str, str]] = set()
    sentences: list[str] = []
    for call in trace:
        if call.name in _UNTOLD_OPS:
            continue
        key = (call.name, json.dumps(call.args, sort_keys=True, default=str), call.result)
        if key in seen:
            continue
        seen.add(key)
        sentences.append(describe_call(call))
    if len(sentences) > max_steps:
        extra = len(sentences) - max_steps
        sentences = sentences[:max_steps] + [f"I take {extra} more similar steps."]
    sentences.append(f"So the answer is {answer}.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------- LLM mode

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def last_sentence(text: str) -> str:
    parts = [p for p in _SENTENCE_SPLIT.split(text.strip()) if p.strip()]
    return parts[-1] if parts else ""


def states_answer(text: str, answer: str) -> bool:
    """Does the rationale's last sentence state ``answer`` (after VQA normalization)?"""
    want = normalize_answer(answer)
    if not want:
        return False
    return f" {want} " in f" {normalize_answer(last_sentence(text))} "


def finish_rationale(text: str, answer: str) -> str:
    """Make an accepted LLM rationale end in the fixed "So the answer is X." form."""
    text = text.strip()
    if re.search(r"answer is", last_sentence(text), re.IGNORECASE):
        return text
    return f"{text} So the answer is {answer}."


def trace_text(trace: list[ToolCall]) -> str:
    lines = []
    for i, c in enumerate(trace, 1):
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in c.args.items())
        lines.append(f"{i}. {c.name}({args}) -> {c.result}")
    return "\n".join(lines) or "(no tool calls)"


def load_prompt(version: str) -> tuple[str, str]:
    """``(system, user template)`` from ``prompts/rationale/<version>/``."""
    folder = PROMPTS_DIR / version
    try:
        system = (folder / "system.txt").read_text(encoding="utf-8").strip()
        user = (folder / "user.txt").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise VpdError(
            f"rationale prompt {version!r} not found (need {folder}/system.txt and user.txt)"
        ) from None
    return system, user


def build_messages(
    system: str, user: str, question: str, program: str, trace: list[ToolCall], answer: str
) -> list[dict[str, Any]]:
    body = (
        user.replace("{question}", question)
        .replace("{program}", program.strip())
        .replace("{trace}", trace_text(trace))
        .replace("{answer}", answer)
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": body}]


# ----------------------------------------------------------------------------- SFT records


def sft_image(question: Question, questions_file: Path, out: Path) -> str:
    """The question's image path as the SFT file sees it (relative to its folder)."""
    img = Path(question.image)
    if not img.is_absolute():
        img = Path(questions_file).resolve().parent / img
    try:
        return os.path.relpath(img, Path(out).resolve().parent)
    except ValueError:  # e.g. different drives on Windows
        return str(img)


def answer_record(qid: str, image: str, question: str, answer: str, **extra: Any) -> Sft:
    return Sft(
        id=f"{qid}/answer",
        qid=qid,
        image=image,
        task="answer",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": f"{question}\n{ANSWER_SUFFIX}"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        **extra,
    )


def rationale_record(rid: str, image: str, question: str, rationale: str, **extra: Any) -> Sft:
    return Sft(
        id=rid,
        image=image,
        task="rationale",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": f"{question}\n{RATIONALE_SUFFIX}"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": rationale}]},
        ],
        **extra,
    )


def labelled_answer(question: Question) -> str | None:
    """The human label to train on: the most common answer (ties: the first given)."""
    if not question.answers:
        return None
    counts: dict[str, int] = {}
    for a in question.answers:
        counts[a.strip()] = counts.get(a.strip(), 0) + 1
    return max(counts, key=lambda a: counts[a]) or None


# ----------------------------------------------------------------------------- stage


class RationalizeConfig(BaseModel):
    """Turn kept programs and their traces into answer + rationale training records.

    Per kept question: QID/answer (short answer) and QID/rationale (steps grounded in
    the tool results, ending "So the answer is X."). Image paths are written relative
    to the folder of --out.

    Every option of `vpd rationalize` (also the `rationalize:` section of a recipe).
    """

    model_config = ConfigDict(extra="forbid")

    verified: Path = Field(description="Verified JSONL from `vpd verify`.")
    questions: Path = Field(description="Questions JSONL.")
    out: Path = Field(description="SFT JSONL (chat records).")
    mode: Literal["template", "llm"] = Field("template", description="template (no LLM) | llm.")
    per_question: int = Field(
        default=1, ge=1, description="Rationales per question (kept programs)."
    )
    add_labelled: bool = Field(
        False, description="Add the human answer for questions with no kept program."
    )
    llm: dict[str, Any] = Field(
        default_factory=dict,
        description="The rationale LLM in llm mode (flags --backend, --model, --base-url, "
        "--api-key).",
        json_schema_extra={"cli": False},
    )
    prompt_version: str = Field("v1", description="prompts/rationale/<version>/.")
    temperature: float = Field(
        default=0.0, ge=0.0, description="LLM mode: sampling temperature of the first try."
    )
    retry_temperature: float = Field(
        default=0.7, ge=0.0, description="LLM mode: temperature of the retries."
    )
    retries: int = Field(default=1, ge=0, description="LLM retries before the template fallback.")
    max_tokens: int = Field(default=384, ge=16, description="LLM mode: new tokens per rationale.")
    max_steps: int = Field(default=40, ge=1, description="Most tool steps a rationale describes.")
    batch_size: int = Field(
        default=32, ge=1, description="Questions per batch (LLM requests are sent together)."
    )
    shard: str | None = shard_field()
    force: bool = force_field()
    progress: bool = progress_field()

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {
            "stage": "rationalize",
            "mode": self.mode,
            "per_question": self.per_question,
            "add_labelled": self.add_labelled,
            "max_steps": self.max_steps,
        }
        if self.mode == "llm":
            fp.update(
                llm=self.llm,
                prompt_version=self.prompt_version,
                temperature=self.temperature,
                retries=self.retries,
                max_tokens=self.max_tokens,
            )
        return fp


class LLMRationalizer:
    """Rewrites program + trace into fluent rationales in batches, with answer checks."""

    def __init__(self, llm: Any, cfg: RationalizeConfig) -> None:
        self.llm, self.cfg = llm, cfg
        self.system, self.user = load_prompt(cfg.prompt_version)
        self.calls = self.retried = self.fallbacks = 0

    def rationalize(self, jobs: list[tuple[str, Verified, str]]) -> list[tuple[str, str]]:
        """``jobs``: (question text, kept record, canonical answer) -> (rationale, mode)."""

        msgs = [
            build_messages(self.system, self.user, q, v.program, v.trace, ans) for q, v, ans in jobs
        ]
        out: list[str | None] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        for attempt in range(self.cfg.retries + 1):
            if not todo:
                break
            params = GenParams(
                n=1,
                temperature=self.cfg.temperature if attempt == 0 else self.cfg.retry_temperature,
                max_tokens=self.cfg.max_tokens,
                seed=attempt,
            )
            if attempt:
                self.retried += len(todo)
            results = self.llm.generate([msgs[i] for i in todo], params)
            self.calls += len(todo)
            failed = []
            for i, comps in zip(todo, results, strict=True):
                text = comps[0].text.strip() if comps else ""
                if text and states_answer(text, jobs[i][2]):
                    out[i] = finish_rationale(text, jobs[i][2])
                else:
                    failed.append(i)
            todo = failed
        done: list[tuple[str, str]] = []
        for i, (_, v, ans) in enumerate(jobs):
            text = out[i]
            if text is None:
                # The LLM never stated the verified answer: the template cannot be wrong.
                self.fallbacks += 1
                done.append((template_rationale(v.trace, ans, self.cfg.max_steps), "fallback"))
            else:
                done.append((text, "llm"))
        return done


@with_config(ConfigDict(extra="forbid"))
class RationalizeSummary(TypedDict, total=False):
    """What `vpd rationalize` returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    questions: int
    questions_with_kept: int
    questions_done_before: int
    questions_without_label: int
    written: int
    answer_records: int
    rationale_records: int
    labelled_answer_records: int
    rejects: int
    wall_s: float
    records_per_s: float | None
    llm_requests: int
    llm_retries: int
    llm_fallback_to_template: int


def run_rationalize(cfg: RationalizeConfig, llm: Any = None) -> RationalizeSummary:
    """Write answer + rationale SFT records per kept question (resumable); returns a summary.

    ``llm`` (tests, or a caller holding one): an object implementing ``vpd.llm.base.LLM``
    used in llm mode instead of building one from ``cfg.llm``.
    """
    t0 = time.time()
    shard = parse_shard(cfg.shard)
    if cfg.out.resolve() in {cfg.verified.resolve(), cfg.questions.resolve()}:
        raise VpdError(f"--out {cfg.out} is also an input")
    counts = {"answer": 0, "rationale": 0, "labelled": 0, "no_label": 0}
    questions_total = with_kept = skipped = 0
    rat: LLMRationalizer | None = None
    owned_llm = None  # an LLM this run built (closed at the end), not a caller's
    with StageOutput(cfg.out, cfg.fingerprint(), shard=shard, force=cfg.force) as so:
        questions: dict[str, Question] = {}
        checks = ImageChecks()

        def image_problem(q: Question) -> str | None:
            # An SFT record whose image does not decode would crash the trainer at its row.
            if not so.owns(q.id):
                return None
            image = Path(cfg.out).resolve().parent / sft_image(q, cfg.questions, cfg.out)
            return checks.problem(image)

        qrej = LabelledRejects(so.rejects, "questions")
        for q in read_records(cfg.questions, Question, qrej, check=image_problem):
            if so.owns(q.id):
                questions[q.id] = q
        questions_total = len(questions)
        kept: dict[str, list[tuple[int, int]]] = {}
        for v, off, line in scan_jsonl(cfg.verified, Verified, so.rejects, "verified"):
            if not v.kept or not so.owns(v.qid):
                continue
            if v.qid not in questions:
                so.rejects.write(line, f"verified: unknown question id {v.qid!r}", v.id, v.id)
                continue
            kept.setdefault(v.qid, []).append((split_sample_id(v.id)[1], off))
        with_kept = len(kept)

        def planned(qid: str) -> list[str]:
            if qid in kept:
                n = min(cfg.per_question, len(kept[qid]))
                if cfg.per_question == 1:
                    return [f"{qid}/answer", f"{qid}/rationale"]
                ks = [k for k, _ in sorted(kept[qid])[:n]]
                return [f"{qid}/answer"] + [f"{qid}/rationale/{k}" for k in ks]
            if cfg.add_labelled and labelled_answer(questions[qid]) is not None:
                return [f"{qid}/answer"]
            return []

        todo = []
        for qid in questions:
            ids = planned(qid)
            if ids and all(so.done(i) for i in ids):
                skipped += 1
            elif ids:
                todo.append(qid)
            elif cfg.add_labelled:
                counts["no_label"] += 1
        if cfg.mode == "llm" and any(qid in kept for qid in todo):
            owned_llm = make_llm_from_spec(cfg.llm) if llm is None else None
            rat = LLMRationalizer(llm if llm is not None else owned_llm, cfg)
        with (
            open(cfg.verified, "rb") as fv,
            progress_bar("rationalize", len(todo), unit="q", enabled=cfg.progress) as bar,
        ):
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                records: dict[str, list[Sft]] = {qid: [] for qid in chunk}
                jobs: list[tuple[str, str, Verified, str]] = []  # (qid, rid, record, answer)
                for qid in chunk:
                    q = questions[qid]
                    image = sft_image(q, cfg.questions, cfg.out)
                    if qid not in kept:
                        label = labelled_answer(q)
                        if label is None:  # planned() schedules only labelled ones
                            continue
                        records[qid].append(
                            answer_record(qid, image, q.question, label, source="label")
                        )
                        continue
                    chosen = sorted(kept[qid])[: cfg.per_question]
                    vs = [load_at(fv, off, Verified) for _, off in chosen]
                    ans = canonical_answer(vs[0].answer, q)
                    records[qid].append(
                        answer_record(
                            qid, image, q.question, ans, source="program", sample=vs[0].id
                        )
                    )
                    for (k, _), v in zip(chosen, vs, strict=True):
                        rid = (
                            f"{qid}/rationale" if cfg.per_question == 1 else f"{qid}/rationale/{k}"
                        )
                        jobs.append((qid, rid, v, canonical_answer(v.answer, q)))
                if rat is not None:
                    texts = rat.rationalize([(questions[j[0]].question, j[2], j[3]) for j in jobs])
                else:
                    texts = [
                        (template_rationale(v.trace, a, cfg.max_steps), "template")
                        for _, _, v, a in jobs
                    ]
                for (qid, rid, v, _), (text, how) in zip(jobs, texts, strict=True):
                    q = questions[qid]
                    image = sft_image(q, cfg.questions, cfg.out)
                    records[qid].append(
                        rationale_record(
                            rid, image, q.question, text, qid=qid, sample=v.id, rationale_mode=how
                        )
                    )
                for qid in chunk:  # one question's records land together
                    for rec in records[qid]:
                        if not so.done(rec.id):
                            so.write(rec)
                            counts[rec.task] += 1
                            counts["labelled"] += getattr(rec, "source", "") == "label"
                    bar.advance()
                so.sync()
        rejects = so.rejects.count
    if owned_llm is not None:
        owned_llm.close()
    wall = time.time() - t0
    written = counts["answer"] + counts["rationale"]
    summary: dict[str, Any] = {
        "out": str(cfg.out),
        "questions": questions_total,
        "questions_with_kept": with_kept,
        "questions_done_before": skipped,
        "written": written,
        "answer_records": counts["answer"],
        "rationale_records": counts["rationale"],
        "labelled_answer_records": counts["labelled"],
        "rejects": rejects,
        "wall_s": round(wall, 3),
        "records_per_s": round(written / wall, 1) if wall > 0 else None,
    }
    if cfg.add_labelled:
        summary["questions_without_label"] = counts["no_label"]
    if cfg.mode == "llm":
        summary.update(
            llm_requests=rat.calls if rat else 0,
            llm_retries=rat.retried if rat else 0,
            llm_fallback_to_template=rat.fallbacks if rat else 0,
        )
    return summary


def summary_line(cfg: RationalizeConfig, s: dict[str, Any]) -> str:
    """What `vpd rationalize` prints when it is done."""
    msg = (
        f"rationalize -> {cfg.out}: {s['answer_records']} answer + {s['rationale_records']} "
        f"rationale records ({s['labelled_answer_records']} from labels)"
    )
    if cfg.mode == "llm":
        msg += f"; {s['llm_fallback_to_template']} template fallbacks"
    if s["rejects"]:
        msg += f"; {s['rejects']} rejected input lines (reasons in {cfg.out}.rejects.jsonl)"
    return msg
