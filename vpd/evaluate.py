"""`vpd eval`: direct-answer evaluation of a VLM on a question set.

The model sees each question exactly as VPD trains it to (``vpd rationalize``'s "answer"
task): the model's own chat template over ``[image, "<question>\\n<ANSWER_SUFFIX>"]``
(a processor without a template gets ``"<image>\\n<question>\\n<ANSWER_SUFFIX>"``).
Answers come from batched greedy decoding (left padding; a batch that runs out of GPU
memory is split, not lost), are cleaned (first line, no "So the answer is", no edge
punctuation) and scored with ``vpd.metrics.score_answer``; questions without gold answers
are predicted but not scored.

Outputs (resume contract: ``StageOutput``, shard by question id, meta = model + prompt +
generation parameters; the batch size and device are not in it since they do not change
greedy answers):

- ``--out PREDS``: one record per question: ``id, qid, prediction, score, qtype, metric,
  raw`` (+ ``rationale, rationale_answer, rationale_score`` with ``--rationale``);
- ``PREDS.report.json``: accuracy overall and per question type, counts, wall time,
  examples/s, and a majority-answer baseline from ``--train-questions`` so a user sees
  the model against the trivial "always say the most common answer" predictor.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.hardware import resolve_dtype
from vpd.images import resolve_image
from vpd.metrics import (
    Metric,
    normalize_answer,
    paired_bootstrap,
    resolve_metric,
    score_answer,
)
from vpd.options import force_field, progress_field, shard_field
from vpd.progress import console, progress_bar
from vpd.records import Prediction, Question
from vpd.store import (
    RejectWriter,
    StageOutput,
    atomic_write_json,
    parse_shard,
    read_json,
    read_records,
)
from vpd.vlm import (
    ANSWER_SUFFIX,
    EDGE_PUNCT,
    RATIONALE_SUFFIX,
    Generator,
    clean_answer,
    first_line,
    load_model,
    model_digest,
    resolve_device,
    resolve_model,
)

ALL_TYPES = "all"  # the type of questions whose meta names none

# ----------------------------------------------------------------------------- config


class EvalConfig(BaseModel):
    """Evaluate a VLM's direct answers (greedy, VPD answer prompt) on a question set.

    Writes one prediction per question (prediction, score, qtype) and OUT.report.json
    (accuracy overall and per question type, examples/s, majority baseline). Re-running
    the same command resumes.

    Every option of `vpd eval` (also the `eval:` section of a recipe).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, description="VLM folder in Hugging Face format (tune's final/), or a hub id."
    )
    questions: Path = Field(description="Questions JSONL to evaluate on.")
    out: Path = Field(description="Predictions JSONL; report in OUT.report.json.")
    batch_size: int = Field(default=8, ge=1, description="Questions per generate call.")
    max_new_tokens: int = Field(default=16, ge=1, description="Answer tokens.")
    rationale: bool = Field(False, description="Also generate and store rationales.")
    rationale_max_new_tokens: int = Field(
        default=256, ge=1, description="Rationale tokens (with --rationale)."
    )
    train_questions: Path | None = Field(
        None, description="Train questions for the majority-answer baseline."
    )
    metric: Metric = Field(
        "auto", description="auto (each dataset's official metric) or a metric name, as vpd verify."
    )
    limit: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N questions."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the VLM runs.")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model folder/hub."
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template for processors that ship none."
    )  # Jinja file for processors that ship none
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype (auto: bf16 where native: GPU, AMX or AVX512-BF16 CPU)."
    )
    shard: str | None = shard_field()
    force: bool = force_field()
    progress: bool = progress_field()

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    def template_text(self) -> str | None:
        if self.chat_template is None:
            return None
        if not self.chat_template.is_file():
            raise VpdError(f"--chat-template {self.chat_template}: file not found")
        return self.chat_template.read_text(encoding="utf-8")

    def fingerprint(self, model_digest: str, dtype: str) -> dict[str, Any]:
        """Options that change the predictions (not batch size, device, limit, progress)."""
        fp: dict[str, Any] = {
            "stage": "eval",
            "model": self.model,
            "model_digest": model_digest,
            "dtype": dtype,
            "prompt": ANSWER_SUFFIX,
            "decoding": "greedy",
            "max_new_tokens": self.max_new_tokens,
            "metric": self.metric,
        }
        if self.chat_template is not None:
            text = self.template_text() or ""
            fp["chat_template"] = hashlib.sha256(text.encode()).hexdigest()[:16]
        if self.rationale:
            fp.update(
                rationale_prompt=RATIONALE_SUFFIX,
                rationale_max_new_tokens=self.rationale_max_new_tokens,
            )
        return fp


# ----------------------------------------------------------------------------- answers

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)


def answer_from_rationale(text: str) -> str | None:
    """The answer a rationale states in its "So the answer is X." ending, if any."""
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    tail = text[hits[-1].end() :].strip()
    # The answer ends at the line's end or at a sentence end (a period not inside a number).
    tail = tail.splitlines()[0] if tail else ""
    tail = re.split(r"(?<!\d)\.(?!\d)|\.\s", tail, maxsplit=1)[0]
    ans = tail.strip(EDGE_PUNCT)
    return ans or None


def has_gold(q: Question) -> bool:
    """Whether a question can be scored (an unlabelled test set still gets predictions)."""
    return bool(q.answers) or isinstance(q.meta.get("correct_choice_idx"), int)


def qtype_of(q: Question) -> str:
    """The question type used for the per-type breakdown."""
    t = q.meta.get("qtype") or q.meta.get("type")
    return str(t) if t not in (None, "") else ALL_TYPES


# ----------------------------------------------------------------------------- baseline


def majority_answers(train: list[Question]) -> tuple[dict[str, str], str | None]:
    """Most common (normalized) answer per question type in ``train``, and overall.

    Each question votes with its own most common answer, so a 10-annotator VQA question
    counts once, like a 1-answer one. Ties go to the answer seen first.
    """
    per_type: dict[str, Counter[str]] = {}
    overall: Counter[str] = Counter()
    for q in train:
        if not q.answers:
            continue
        votes = Counter(normalize_answer(a) for a in q.answers)
        ans = votes.most_common(1)[0][0]
        if not ans:
            continue
        per_type.setdefault(qtype_of(q), Counter())[ans] += 1
        overall[ans] += 1
    best = {t: c.most_common(1)[0][0] for t, c in per_type.items()}
    return best, (overall.most_common(1)[0][0] if overall else None)


def majority_predictions(
    train: list[Question], questions: list[Question], metric: str = "auto"
) -> dict[str, tuple[str, str | None, float]]:
    """Per scorable question: ``(qtype, the majority guess, its score)``, where the guess is
    the train set's most common answer for the question's type (a type absent from train
    falls back to the overall most common answer)."""
    best, fallback = majority_answers(train)
    out: dict[str, tuple[str, str | None, float]] = {}
    for q in questions:
        if not has_gold(q):
            continue
        guess = best.get(qtype_of(q), fallback)
        out[q.id] = (
            qtype_of(q),
            guess,
            score_answer(guess, q, metric) if guess is not None else 0.0,
        )
    return out


def majority_baseline(
    train: list[Question], questions: list[Question], metric: str = "auto"
) -> dict[str, Any]:
    """Score "always answer the train set's most common answer for this type" on ``questions``.

    A type absent from train falls back to the overall most common answer.
    """
    best, fallback = majority_answers(train)
    per: dict[str, list[float]] = {}
    for qtype, _, score in majority_predictions(train, questions, metric).values():
        per.setdefault(qtype, []).append(score)
    scores = [s for v in per.values() for s in v]
    return {
        "accuracy": _mean(scores),
        "n": len(scores),
        "train_questions": len(train),
        "per_type": {
            t: {"accuracy": _mean(v), "n": len(v), "answer": best.get(t, fallback)}
            for t, v in sorted(per.items())
        },
    }


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


# ----------------------------------------------------------------------------- comparisons


ArmScores = dict[str, tuple[str, float]]  # question id -> (question type, score)


def compare_arms(
    a: ArmScores, b: ArmScores, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """``a - b`` on the questions both arms answered: overall and per question type, each
    with its paired bootstrap interval."""
    common = sorted(set(a) & set(b))
    groups: dict[str, list[str]] = {ALL_TYPES: common}
    for qid in common:
        groups.setdefault(f"type:{a[qid][0]}", []).append(qid)
    out: dict[str, Any] = {}
    for name, ids in groups.items():
        res = paired_bootstrap(
            [a[q][1] for q in ids], [b[q][1] for q in ids], n_boot=n_boot, level=level, seed=seed
        )
        out[name.removeprefix("type:") if name != ALL_TYPES else ALL_TYPES] = res
    per_type = {k: v for k, v in out.items() if k != ALL_TYPES}
    return {"all": out[ALL_TYPES], "per_type": dict(sorted(per_type.items()))}


def pool_seeds(runs: list[ArmScores]) -> ArmScores:
    """One arm tuned at several seeds as one: each question's score averaged over the
    seeds (on the questions every seed answered), so a paired bootstrap that resamples
    questions carries the seed-to-seed spread inside each question's score."""
    if not runs:
        return {}
    common = set(runs[0]).intersection(*runs[1:])
    return {q: (runs[0][q][0], sum(r[q][1] for r in runs) / len(runs)) for q in sorted(common)}


def accuracy_interval(
    scores: ArmScores, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of an arm's mean score (questions resampled)."""
    if not scores:
        return None
    vals = [v for _, v in scores.values()]
    res = paired_bootstrap(vals, [0.0] * len(vals), n_boot=n_boot, level=level, seed=seed)
    return res["lo"], res["hi"]


def arm_scores(preds: list[dict[str, Any]]) -> ArmScores:
    """Per-question scores of prediction records (unscored ones left out)."""
    return {
        p["id"]: (p.get("qtype") or ALL_TYPES, float(p["score"]))
        for p in preds
        if p.get("score") is not None
    }


# ----------------------------------------------------------------------------- reading


def _image_path(q: Question, questions_file: Path) -> Path:
    return resolve_image(q.image, Path(questions_file).parent)


def _open_image(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _load_batch(batch: list[Question], questions_file: Path) -> list[tuple[Question, Any, str]]:
    """(question, image or None, error) per question; decoding happens off the main thread."""
    out = []
    for q in batch:
        try:
            out.append((q, _open_image(_image_path(q, questions_file)), ""))
        except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
            out.append((q, None, f"image could not be decoded: {first_line(e)}"))
    return out


def _batches(items: list[Question], size: int) -> Iterator[list[Question]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _read_questions(path: Path, rejects: Any, check: Any = None) -> list[Question]:
    return list(read_records(path, Question, rejects, check=check))


# ----------------------------------------------------------------------------- report


def report_path(out: Path) -> Path:
    return Path(str(out) + ".report.json")


@with_config(ConfigDict(extra="forbid"))
class AccuracyReport(TypedDict, total=False):
    """What :func:`build_report` computes from predictions (eval and the programs arm)."""

    accuracy: float | None
    n: int
    correct: float
    unscored: int
    per_type: dict[str, Any]
    rationale_accuracy: float | None


def build_report(
    preds: list[dict[str, Any]], baseline: dict[str, Any] | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Accuracy overall and per type from prediction records (all of them, resumed ones too)."""
    per: dict[str, list[float]] = {}
    rat: list[float] = []
    unscored = 0
    for p in preds:
        if p.get("score") is None:  # no gold answer: a prediction, but no accuracy
            unscored += 1
            continue
        per.setdefault(p.get("qtype") or ALL_TYPES, []).append(float(p["score"]))
        if p.get("rationale_score") is not None:
            rat.append(float(p["rationale_score"]))
    scores = [s for v in per.values() for s in v]
    rep: dict[str, Any] = {
        "accuracy": _mean(scores),
        "n": len(scores),
        "correct": round(sum(scores), 6),
        "unscored": unscored,
        "per_type": {
            t: {"accuracy": _mean(v), "n": len(v), "correct": round(sum(v), 6)}
            for t, v in sorted(per.items())
        },
    }
    if rat:
        rep["rationale_accuracy"] = _mean(rat)
    if baseline is not None:
        rep["majority_baseline"] = baseline
    rep.update(extra)
    return rep


def _print_table(rep: dict[str, Any], title: str) -> None:
    from rich.table import Table

    base = rep.get("majority_baseline") or {}
    table = Table(title=title)
    table.add_column("question type")
    table.add_column("n", justify="right")
    table.add_column("model", justify="right")
    if base:
        table.add_column("majority baseline", justify="right")

    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.1f}%"

    for t, r in rep["per_type"].items():
        row = [t, str(r["n"]), pct(r["accuracy"])]
        if base:
            row.append(pct((base.get("per_type") or {}).get(t, {}).get("accuracy")))
        table.add_row(*row)
    table.add_section()
    row = ["[bold]all[/]", str(rep["n"]), f"[bold]{pct(rep['accuracy'])}[/]"]
    if base:
        row.append(pct(base.get("accuracy")))
    table.add_row(*row)
    console().print(table)


# ----------------------------------------------------------------------------- stage


@with_config(ConfigDict(extra="forbid"))
class EvalSummary(AccuracyReport, total=False):
    """What `vpd eval` returns (also OUT.report.json).

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    majority_baseline: dict[str, Any] | None
    model: str
    questions_file: str
    predictions_file: str
    questions: int
    predicted: int
    missing: int
    new: int
    already_done: int
    rejected: int
    device: str
    dtype: str
    batch_size: int
    shard: str | None
    wall_s: float
    generate_s: float
    examples_per_s: float | None
    s_per_question: float | None
    prompt_format: str
    oom_splits: int
    rationales: int


def run_eval(cfg: EvalConfig) -> EvalSummary:
    """Predict, score and report (resumable); returns the report (also written as JSON)."""
    t0 = time.time()
    shard = parse_shard(cfg.shard)
    for name, p in (("--questions", cfg.questions), ("--train-questions", cfg.train_questions)):
        if p is not None and p.exists() and cfg.out.resolve() == p.resolve():
            raise VpdError(f"--out {cfg.out} is also the {name} file")
    if cfg.train_questions is not None and not cfg.train_questions.exists():
        raise VpdError(f"--train-questions file not found: {cfg.train_questions}")
    if not cfg.questions.exists():
        raise VpdError(f"--questions file not found: {cfg.questions}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    src = resolve_model(cfg.model)  # fails before anything is written beside --out
    digest = model_digest(src)

    with StageOutput(cfg.out, cfg.fingerprint(digest, dtype), shard=shard, force=cfg.force) as so:

        def check(q: Question) -> str | None:
            if not so.owns(q.id) or so.done(q.id):
                return None  # only work still to do needs a readable image
            img = _image_path(q, cfg.questions)
            if not img.is_file():
                return f"image not found: {img}"
            return None

        # (an empty file is refused by the reader itself)
        questions = [q for q in _read_questions(cfg.questions, so.rejects, check) if so.owns(q.id)]
        if cfg.limit is not None:
            questions = questions[: cfg.limit]
        if not questions:
            if so.rejects.count:
                raise VpdError(
                    f"no usable question in {cfg.questions}: all {so.rejects.count} lines were "
                    f"rejected (reasons in {so.rejects.path})"
                )
            if shard is None:
                raise VpdError(f"--questions {cfg.questions} holds no questions")
        todo = [q for q in questions if not so.done(q.id)]
        already = len(questions) - len(todo)

        gen_s = 0.0
        decode_errors = 0
        gen_info: dict[str, Any] = {}
        if todo:
            model, processor = load_model(src, dtype, device, cfg.trust_remote_code)
            gen = Generator(model, processor, cfg.template_text())
            with (
                ThreadPoolExecutor(max_workers=1) as pool,
                progress_bar("eval", len(todo), unit="q", enabled=cfg.progress) as bar,
            ):
                batches = list(_batches(todo, cfg.batch_size))
                # Decode the next batch's images while the model works on this one.
                pending = pool.submit(_load_batch, batches[0], cfg.questions)
                for i in range(len(batches)):
                    loaded = pending.result()
                    if i + 1 < len(batches):
                        pending = pool.submit(_load_batch, batches[i + 1], cfg.questions)
                    ok = [(q, im) for q, im, err in loaded if im is not None]
                    for q, _, err in loaded:
                        if err:
                            so.rejects.write(0, err, q.model_dump_json(), q.id)
                            decode_errors += 1
                    t_gen = time.perf_counter()
                    if ok:
                        for rec in _predict(gen, ok, cfg):
                            so.write(rec)
                    gen_s += time.perf_counter() - t_gen
                    so.sync()
                    bar.advance(len(loaded))
            gen_info = {"prompt_format": gen.prompt_format, "oom_splits": gen.oom_splits}
            del model, gen

        # The report covers every prediction of this eval set, resumed ones included.
        wanted = {q.id: q for q in questions}
        preds = [p for p in read_preds(cfg.out) if p["id"] in wanted]
        baseline = None
        if cfg.train_questions is not None:
            # Bad train lines only weaken the baseline; why each was dropped goes beside --out.
            train_rejects = RejectWriter(Path(str(cfg.out) + ".train-rejects.jsonl"))
            with train_rejects:
                train = _read_questions(cfg.train_questions, train_rejects)
            baseline = majority_baseline(train, questions, cfg.metric)
            baseline["train_rejected"] = train_rejects.count
        new = len(todo) - decode_errors
        wall = time.time() - t0
        # Seconds per question of this invocation (model loading included, as a user waits
        # for it); a rerun with nothing left to do keeps the figure of the run that did it.
        old = _read_report(report_path(cfg.out)) if new == 0 else None
        s_per_q = round(wall / new, 4) if new else (old or {}).get("s_per_question")
        rep = build_report(
            preds,
            baseline,
            {
                "model": cfg.model,
                "questions_file": str(cfg.questions),
                "predictions_file": str(cfg.out),
                "questions": len(questions),
                "predicted": len(preds),
                "missing": len(questions) - len(preds),
                "new": new,
                "already_done": already,
                "rejected": so.rejects.count,
                "device": device,
                "dtype": dtype,
                "batch_size": cfg.batch_size,
                "shard": str(shard) if shard else None,
                "wall_s": round(wall, 3),
                "generate_s": round(gen_s, 3),
                "examples_per_s": round(new / gen_s, 3) if gen_s > 0 else None,
                "s_per_question": s_per_q,
                **gen_info,
            },
        )
    atomic_write_json(report_path(cfg.out), rep, indent=2, sort_keys=False)
    if cfg.progress:
        _print_table(rep, f"vpd eval: {cfg.model}")
    return rep


def _predict(
    gen: Generator, batch: list[tuple[Question, Any]], cfg: EvalConfig
) -> list[Prediction]:
    images = [im for _, im in batch]
    qs = [q for q, _ in batch]
    raw = gen.generate(
        images, [gen.prompt(q.question, ANSWER_SUFFIX) for q in qs], cfg.max_new_tokens
    )
    rats: list[str] | None = None
    if cfg.rationale:
        rats = gen.generate(
            images,
            [gen.prompt(q.question, RATIONALE_SUFFIX) for q in qs],
            cfg.rationale_max_new_tokens,
        )
    out = []
    for i, q in enumerate(qs):
        pred = clean_answer(raw[i])
        gold = has_gold(q)
        extra: dict[str, Any] = {}
        if rats is not None:
            rat = rats[i].strip()
            rans = answer_from_rationale(rat)
            extra = {
                "rationale": rat,
                "rationale_answer": rans,
                "rationale_score": (score_answer(rans, q, cfg.metric) if rans else 0.0)
                if gold
                else None,
            }
        out.append(
            Prediction(
                id=q.id,
                qid=q.id,
                prediction=pred,
                score=score_answer(pred, q, cfg.metric) if gold else None,
                qtype=qtype_of(q),
                metric=resolve_metric(q, cfg.metric),
                raw=raw[i],
                **extra,
            )
        )
    return out


def _read_report(path: Path) -> dict[str, Any] | None:
    rep = read_json(path)
    return rep if isinstance(rep, dict) else None


def read_preds(path: Path) -> list[dict[str, Any]]:
    """Complete prediction lines of ``path`` (a torn tail from a kill is skipped)."""
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                out.append(rec)
    return out


def summary_line(cfg: EvalConfig, r: dict[str, Any]) -> str:
    """What `vpd eval` prints when it is done."""
    acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
    msg = (
        f"eval -> {cfg.out}: accuracy {acc} on {r['predicted']}/{r['questions']} questions "
        f"({r['new']} new, {r['already_done']} already done"
        + (f", {r['examples_per_s']} examples/s" if r["examples_per_s"] else "")
        + ")"
    )
    base = r.get("majority_baseline")
    if base and base.get("accuracy") is not None:
        msg += f"; majority baseline {100 * base['accuracy']:.1f}%"
    if r.get("rationale_accuracy") is not None:
        msg += f"; rationale accuracy {100 * r['rationale_accuracy']:.1f}%"
    if r["rejected"]:
        msg += f"; {r['rejected']} rejected (see {cfg.out}.rejects.jsonl)"
    return msg
