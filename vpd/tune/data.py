"""SFT records -> model inputs, through the model's own processor and chat template.

Every example is rendered with ``processor.apply_chat_template`` and encoded with
``processor(text=..., images=...)``, so image-token expansion (LLaVA's fixed grid,
Qwen2-VL's dynamic patches, Idefics3's tiles, PaliGemma's prefix) is the family's own.
Labels cover only the assistant turn(s): the span of turn i is found by rendering the
conversation up to turn i with ``add_generation_prompt=True`` (its token length is where
the answer starts) and up to turn i inclusive (where it ends). Everything else (system,
user text, image tokens, padding) is -100.

Too-long examples (``max_length`` tokens): ``truncation="drop"`` (default) leaves them out;
``"truncate"`` cuts the answer's tail when the whole prompt (with every image token) still
fits and some answer remains, else drops. Both are counted, and drops go to the rejects file.

Layouts (``layout``):

- ``question`` (default; VPD's, Hu et al. 2024 Sec. 3): the records of one question (``qid``)
  form ONE example holding one sequence per task: its ``answer`` record and, where a program
  was kept, its ``rationale`` record(s). The loss sums each task's cross-entropy averaged over
  its own tokens (:mod:`vpd.tune.loss`), ``task_weights`` scaling each term; a task of weight
  0 is left out, so ``rationale=0`` trains on exactly the same examples, in the same order,
  without the rationale term (the ``labels`` arm). Every example needs an answer record (one
  without is rejected), and examples are grouped by the length of their answer sequence, the
  same in both arms.
- ``records``: every record its own example; ``task_weights={"answer": 1, "rationale": 0.5}``
  repeats/sub-samples each task's examples to ``round(weight * count)``, deterministically by
  ``seed``.

Turns per image (``turns_per_image=N``, ``records`` layout): the single-turn ``answer``
examples of one image are joined, up to N at a time, into one multi-turn conversation (the
image in the first turn only, each answer a labelled turn), as LLaVA's instruction data is.
The image's tokens are then encoded once for N questions instead of N times. Other tasks
stay as they are, and task weights count conversations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.images import resolve_image
from vpd.progress import progress_bar
from vpd.records import Sft
from vpd.store import RejectWriter, read_records
from vpd.tune.loss import IGNORE_INDEX, row_weights

LAYOUTS = ("question", "records")
# Sequence-shaped keys padded along the token axis; everything else is image-side.
_SEQ_PAD = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}
_SEQ_KEYS_ZERO = ("token_type_ids", "mm_token_type_ids")


def parse_task_weights(spec: str | dict[str, float] | None) -> dict[str, float]:
    """``"answer=1,rationale=0.5"`` -> ``{"answer": 1.0, "rationale": 0.5}``."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise VpdError(f"--task-weights: expected task=weight, got {part.strip()!r}")
            items.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    for name, value in items:
        if name not in ("answer", "rationale"):
            raise VpdError(f"--task-weights: unknown task {name!r} (use answer, rationale)")
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise VpdError(f"--task-weights: weight for {name} must be a number") from None
        if w < 0:
            raise VpdError(f"--task-weights: weight for {name} must be >= 0")
        out[name] = w
    return out


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain-string content -> ``[{"type": "text", "text": ...}]`` (what VLM templates expect)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, str):
                    parts.append({"type": "text", "text": p})
                elif isinstance(p, dict) and p.get("type") == "image":
                    parts.append({"type": "image"})  # the pixels travel separately
                else:
                    parts.append(p)
            content = parts
        out.append({"role": m.get("role"), "content": content})
    return out


def _n_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        for p in (m["content"] if isinstance(m["content"], list) else [])
        if isinstance(p, dict) and p.get("type") == "image"
    )


def _check_messages(rec: Sft) -> str | None:
    roles = [m.get("role") for m in rec.messages if isinstance(m, dict)]
    if len(roles) != len(rec.messages):
        return "messages must be objects with role and content"
    if "assistant" not in roles:
        return "no assistant turn to learn from"
    if roles[0] == "assistant":
        return "conversation starts with the assistant"
    for m in rec.messages:
        c = m.get("content")
        if not isinstance(c, str | list):
            return f"{m.get('role')} content must be a string or a list of parts"
        if m.get("role") == "assistant" and not (
            c.strip()
            if isinstance(c, str)
            else any(isinstance(p, dict) and p.get("text") for p in c)
        ):
            return "empty assistant turn"
    return None


@dataclass
class Example:
    id: str
    task: str
    image: Path
    messages: list[dict[str, Any]]
    qid: str = ""


def record_qid(rec: Sft) -> str:
    """The question a record belongs to: its ``qid`` key, else its id before the task
    (``<qid>/answer``, ``<qid>/rationale[/k]``)."""
    qid = getattr(rec, "qid", None)
    if isinstance(qid, str) and qid:
        return qid
    for tail in ("/answer", "/rationale"):
        if tail in rec.id:
            return rec.id.rsplit(tail, 1)[0]
    return rec.id


@dataclass
class QuestionExample:
    """One question's training example: one sequence per task (answer first)."""

    id: str
    image: Path
    parts: list[Example]

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.parts]


@dataclass
class DataStats:
    records: int = 0
    rejected: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    per_task: dict[str, int] = field(default_factory=dict)
    examples: int = 0  # after mixing (repeats included)
    max_tokens: int = 0
    mean_tokens: float = 0.0


def read_sft(path: Path, rejects: RejectWriter | None = None) -> list[Example]:
    """Validated SFT examples; bad lines (schema, missing image, no answer) go to rejects."""
    path = Path(path)
    base = path.parent

    def image_path(rec: Sft) -> Path:
        return resolve_image(rec.image, base)

    def check(rec: Sft) -> str | None:
        why = _check_messages(rec)
        if why:
            return why
        if not image_path(rec).is_file():
            return f"image not found: {rec.image}"
        return None

    return [
        Example(
            rec.id, rec.task, image_path(rec), normalize_messages(rec.messages), record_qid(rec)
        )
        for rec in read_records(path, Sft, rejects=rejects, check=check)
    ]


def group_questions(
    examples: list[Example], weights: dict[str, float]
) -> tuple[list[QuestionExample], list[Example]]:
    """One example per question (first-appearance order), its answer sequence first, then
    its other tasks in file order; tasks of weight 0 are left out. Returns ``(examples,
    records of questions without an answer record)``."""
    by_qid: dict[str, list[Example]] = {}
    for ex in examples:
        by_qid.setdefault(ex.qid or ex.id, []).append(ex)
    groups: list[QuestionExample] = []
    orphans: list[Example] = []
    for qid, recs in by_qid.items():
        answers = [r for r in recs if r.task == "answer"]
        if not answers:
            orphans.extend(recs)
            continue
        if len(answers) > 1:  # one answer per question; extra ones go with the orphans
            orphans.extend(answers[1:])
        others = [r for r in recs if r.task != "answer" and weights.get(r.task, 1.0) > 0]
        groups.append(QuestionExample(qid, answers[0].image, [answers[0], *others]))
    return groups, orphans


def _single_answer_turn(ex: Example) -> bool:
    """One user turn holding the image first, then one assistant turn."""
    if ex.task != "answer" or [m["role"] for m in ex.messages] != ["user", "assistant"]:
        return False
    content = ex.messages[0]["content"]
    return (
        isinstance(content, list)
        and bool(content)
        and content[0].get("type") == "image"
        and _n_images(ex.messages) == 1
    )


def group_turns(examples: list[Example], per_image: int) -> list[Example]:
    """Join the single-turn answer examples of each image, ``per_image`` at a time, into
    multi-turn conversations (file order kept; the others pass through unchanged)."""
    if per_image <= 1:
        return list(examples)
    by_image: dict[Path, list[Example]] = {}
    out: list[Example | Path] = []
    for ex in examples:
        if _single_answer_turn(ex):
            if ex.image not in by_image:
                by_image[ex.image] = []
                out.append(ex.image)  # the conversations take the first question's place
            by_image[ex.image].append(ex)
        else:
            out.append(ex)
    joined: list[Example] = []
    for item in out:
        if isinstance(item, Example):
            joined.append(item)
            continue
        group = by_image[item]
        for i in range(0, len(group), per_image):
            part = group[i : i + per_image]
            messages = list(part[0].messages)
            for ex in part[1:]:
                user, answer = ex.messages
                text_only = [c for c in user["content"] if c.get("type") != "image"]
                messages += [{**user, "content": text_only}, answer]
            ex_id = part[0].id if len(part) == 1 else f"{part[0].id}+{len(part) - 1}"
            joined.append(Example(ex_id, "answer", item, messages))
    return joined


def mix_tasks(examples: list[Example], weights: dict[str, float], seed: int) -> list[Example]:
    """Repeat/sub-sample each task to ``round(w * n)`` examples; unlisted tasks keep weight 1."""
    if not weights:
        return list(examples)
    rng = random.Random(seed)
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    out: list[Example] = []
    for task in sorted(by_task):
        group = by_task[task]
        n = round(weights.get(task, 1.0) * len(group))
        whole, rest = divmod(n, len(group))
        out.extend(group * whole)
        out.extend(rng.sample(group, rest))
    return out


class ChatEncoder:
    """Encodes one example with the processor; returns tensors without a batch axis."""

    def __init__(
        self,
        processor: Any,
        max_length: int = 512,
        truncation: str = "drop",
        model_type: str = "",
    ) -> None:
        if truncation not in ("drop", "truncate"):
            raise VpdError("truncation must be 'drop' or 'truncate'")
        if getattr(processor, "chat_template", None) is None:
            raise VpdError(
                "the model's processor has no chat template; give one with --chat-template FILE "
                "(a Jinja template with an image slot)"
            )
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.truncation = truncation
        # PaliGemma attends bidirectionally over token_type_ids == 0 ("prefix"); the answer
        # must be marked 1 or training would let it see itself.
        self.mark_suffix = model_type == "paligemma"

    def _render(self, messages: list[dict[str, Any]], gen: bool) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=gen, tokenize=False
        )

    def _encode(self, text: str, images: list[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = [images]
        # Templates already hold BOS etc.; letting the tokenizer add them again would
        # double them, and shift our prefix arithmetic.
        try:
            return self.processor(**kwargs, add_special_tokens=False)
        except TypeError:
            return self.processor(**kwargs)

    def encode(self, ex: Example) -> tuple[dict[str, Any] | None, str]:
        """Return ``(features, status)``; status is ``ok``, ``truncated`` or ``too_long``."""
        from PIL import Image

        with Image.open(ex.image) as im:
            image = im.convert("RGB")
        try:
            return self.encode_messages(ex.messages, image)
        except VpdError as e:
            raise VpdError(f"{ex.id}: {e}") from None

    def encode_image(self, messages: list[dict[str, Any]], image: Any) -> dict[str, Any]:
        """Features of a conversation about an in-memory image (it must fit)."""
        feats, status = self.encode_messages(messages, image)
        if feats is None:
            raise VpdError(f"longer than max_length={self.max_length} tokens")
        return feats

    def encode_messages(
        self, messages: list[dict[str, Any]], image: Any
    ) -> tuple[dict[str, Any] | None, str]:
        """``encode`` for a conversation and its (PIL) image."""
        full_text = self._render(messages, gen=False)
        n_img = _n_images(messages)
        feats = self._encode(full_text, [image] * n_img)
        ids = feats["input_ids"][0]
        labels = ids.new_full(ids.shape, IGNORE_INDEX)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._prefix_len(messages[:i], ids, image, gen=True)
            end = self._prefix_len(messages[: i + 1], ids, image, gen=False)
            labels[start:end] = ids[start:end]
        labelled = (labels != IGNORE_INDEX).nonzero()
        if len(labelled) == 0:
            raise VpdError("the chat template rendered no assistant tokens")
        status = "ok"
        if len(ids) > self.max_length:
            first_label = int(labelled[0])
            if self.truncation == "drop" or first_label >= self.max_length:
                return None, "too_long"
            status = "truncated"
        out = {k: v[0] for k, v in feats.items() if k in _SEQ_PAD or k in _SEQ_KEYS_ZERO}
        out["labels"] = labels
        if status == "truncated":
            out = {k: v[: self.max_length] for k, v in out.items()}
        for k, v in feats.items():
            if k not in out:
                out[k] = v  # image side keeps its own leading axis (cat in the collator)
        if self.mark_suffix and "token_type_ids" in out:
            out["token_type_ids"] = (out["labels"] != IGNORE_INDEX).long()
        return out, status

    def _prefix_len(
        self, messages: list[dict[str, Any]], full_ids: Any, image: Any, gen: bool
    ) -> int:
        text = self._render(messages, gen=gen)
        ids = self._encode(text, [image] * _n_images(messages))["input_ids"][0]
        n = min(len(ids), len(full_ids))
        # Normally a strict prefix; if a tokenizer merged across the boundary, use the
        # longest common prefix so we never label prompt tokens.
        same = (ids[:n] == full_ids[:n]).long()
        return n if bool(same.all()) else int(same.cumprod(0).sum())


class SftDataset:
    """Map-style dataset of pre-screened examples, encoded lazily (images read per item).

    ``lengths[i]`` is example i's token count, known from screening, so a length-grouped
    sampler needs no second encoding pass."""

    def __init__(
        self, examples: list[Example], encoder: ChatEncoder, lengths: list[int] | None = None
    ) -> None:
        self.examples = examples
        self.encoder = encoder
        if lengths is not None and len(lengths) != len(examples):
            raise VpdError("SftDataset: one length per example")
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats, _ = self.encoder.encode(self.examples[i])
        if feats is None:  # screened out in prepare(); only reachable if files changed
            raise VpdError(f"example {self.examples[i].id} no longer fits max_length")
        return feats


class QuestionDataset:
    """Map-style dataset of per-question examples: item i is the list of ``(task, features)``
    of its sequences, encoded lazily. ``lengths[i]`` is its ANSWER sequence's token count
    (the same with and without rationales, so both arms group batches alike)."""

    def __init__(
        self, examples: list[QuestionExample], encoder: ChatEncoder, lengths: list[int]
    ) -> None:
        if len(lengths) != len(examples):
            raise VpdError("QuestionDataset: one length per example")
        self.examples = examples
        self.encoder = encoder
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for part in self.examples[i].parts:
            feats, _ = self.encoder.encode(part)
            if feats is None:  # screened out in prepare(); only reachable if files changed
                raise VpdError(f"example {part.id} no longer fits max_length")
            out.append((part.task, feats))
        return out


def prepare(
    path: Path,
    processor: Any,
    *,
    max_length: int = 512,
    truncation: str = "drop",
    task_weights: dict[str, float] | None = None,
    seed: int = 0,
    model_type: str = "",
    rejects: RejectWriter | None = None,
    progress: bool = True,
    turns_per_image: int = 1,
    layout: str = "question",
) -> tuple[SftDataset | QuestionDataset, DataStats]:
    """Read, validate, group (by question or image turns), length-screen (and, in the
    ``records`` layout, mix) the SFT file; return the dataset and counts (``records``: SFT
    lines read; ``examples``: training examples, i.e. questions or conversations)."""
    if layout not in LAYOUTS:
        raise VpdError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    stats = DataStats()
    encoder = ChatEncoder(processor, max_length, truncation, model_type)
    examples = read_sft(path, rejects)
    stats.rejected = rejects.count if rejects is not None else 0
    stats.records = len(examples)
    if layout == "question":
        return _prepare_questions(examples, encoder, task_weights or {}, stats, rejects, progress)
    examples = group_turns(examples, turns_per_image)
    kept, lengths = _screen(examples, encoder, stats, rejects, progress)
    if not kept:
        raise VpdError(
            f"no usable training examples in {path} ({stats.records} read, "
            f"{stats.rejected} rejected, {stats.dropped_too_long} longer than max_length="
            f"{max_length})"
        )
    mixed = mix_tasks(kept, task_weights or {}, seed)
    if not mixed:
        raise VpdError("task weights left no examples (all weights 0?)")
    for ex in mixed:
        stats.per_task[ex.task] = stats.per_task.get(ex.task, 0) + 1
    stats.examples = len(mixed)
    stats.max_tokens = max(lengths)
    stats.mean_tokens = round(sum(lengths) / len(lengths), 1)
    # By object: mix_tasks repeats or drops the very Example objects it was given.
    length_of = {id(ex): n for ex, n in zip(kept, lengths, strict=True)}
    return SftDataset(mixed, encoder, [length_of[id(ex)] for ex in mixed]), stats


def _screen(
    examples: list[Example],
    encoder: ChatEncoder,
    stats: DataStats,
    rejects: RejectWriter | None,
    progress: bool,
) -> tuple[list[Example], list[int]]:
    """One encoding pass so drops are known (and counted) before training starts: the
    examples that fit and their token counts."""
    kept: list[Example] = []
    lengths: list[int] = []
    with progress_bar("tune: screening examples", len(examples), "ex", progress) as bar:
        for ex in examples:
            try:
                feats, status = encoder.encode(ex)
            except (OSError, ValueError) as e:  # unreadable image, processor refusal
                if rejects is not None:
                    rejects.write(0, f"cannot encode: {e}".splitlines()[0], ex.id, ex.id)
                stats.rejected += 1
                bar.advance()
                continue
            if feats is None:
                stats.dropped_too_long += 1
                if rejects is not None:
                    rejects.write(
                        0, f"longer than max_length={encoder.max_length} tokens", ex.id, ex.id
                    )
            else:
                stats.truncated += status == "truncated"
                lengths.append(len(feats["input_ids"]))
                kept.append(ex)
            bar.advance()
    return kept, lengths


def _prepare_questions(
    examples: list[Example],
    encoder: ChatEncoder,
    weights: dict[str, float],
    stats: DataStats,
    rejects: RejectWriter | None,
    progress: bool,
) -> tuple[QuestionDataset, DataStats]:
    """The ``question`` layout: group, then screen every sequence; an example whose answer
    does not fit is dropped whole, a rationale that does not fit is dropped alone."""
    if weights.get("answer", 1.0) <= 0:
        raise VpdError("the question layout needs the answer task: its weight must be > 0")
    groups, orphans = group_questions(examples, weights)
    for ex in orphans:
        stats.rejected += 1
        if rejects is not None:
            why = "a second answer record" if ex.task == "answer" else "no answer record"
            rejects.write(0, f"{why} for question {ex.qid} (question layout)", ex.id, ex.id)
    parts = [p for g in groups for p in g.parts]
    kept, lengths = _screen(parts, encoder, stats, rejects, progress)
    length_of = {id(p): n for p, n in zip(kept, lengths, strict=True)}
    out: list[QuestionExample] = []
    answer_lengths: list[int] = []
    for g in groups:
        fits = [p for p in g.parts if id(p) in length_of]
        if not fits or fits[0] is not g.parts[0]:
            continue  # the answer itself was dropped: so is the question
        out.append(QuestionExample(g.id, g.image, fits))
        answer_lengths.append(length_of[id(fits[0])])
        for p in fits:
            stats.per_task[p.task] = stats.per_task.get(p.task, 0) + 1
    if not out:
        raise VpdError(
            f"no usable training examples ({stats.records} records read, {stats.rejected} "
            f"rejected, {stats.dropped_too_long} longer than max_length={encoder.max_length})"
        )
    stats.examples = len(out)
    stats.max_tokens = max(lengths)
    stats.mean_tokens = round(sum(lengths) / len(lengths), 1)
    return QuestionDataset(out, encoder, answer_lengths), stats


class Collator:
    """Right-pads token axes (labels with -100) and stacks/zero-pads image tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        longest = max(len(b["input_ids"]) for b in batch)
        for key in batch[0]:
            values = [b[key] for b in batch]
            if key in _SEQ_PAD or key in _SEQ_KEYS_ZERO:
                pad = _SEQ_PAD.get(key, 0)
                pad = self.pad_token_id if pad is None else pad
                t = torch.full((len(batch), longest), pad, dtype=values[0].dtype)
                for i, v in enumerate(values):
                    t[i, : len(v)] = v
                out[key] = t
            else:
                out[key] = _cat_padded(values)
        return out


class TaskCollator:
    """Batches ``question``-layout examples: the sequences of each task are padded together
    (answers apart from the longer rationales) and carry their loss weight
    (:func:`vpd.tune.loss.row_weights`). Returns ``{task: {input_ids, ..., row_weight}}``."""

    def __init__(self, pad_token_id: int, weights: dict[str, float]) -> None:
        self.pad = Collator(pad_token_id)
        self.weights = weights

    def __call__(self, batch: list[list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
        import torch

        weights = row_weights([[task for task, _ in ex] for ex in batch], self.weights)
        rows: dict[str, list[dict[str, Any]]] = {}
        row_w: dict[str, list[float]] = {}
        flat = [seq for ex in batch for seq in ex]
        for (task, feats), w in zip(flat, weights, strict=True):
            rows.setdefault(task, []).append(feats)
            row_w.setdefault(task, []).append(w)
        return {
            task: {**self.pad(rows[task]), "row_weight": torch.tensor(row_w[task])} for task in rows
        }


def _cat_padded(values: list[Any]) -> Any:
    """Concatenate along axis 0, zero-padding other axes (e.g. Idefics3's tile count)."""
    import torch

    shapes = [tuple(v.shape[1:]) for v in values]
    if len(set(shapes)) == 1:
        return torch.cat(values, dim=0)
    target = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    padded = []
    for v in values:
        t = v.new_zeros((v.shape[0], *target))
        t[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
        padded.append(t)
    return torch.cat(padded, dim=0)
