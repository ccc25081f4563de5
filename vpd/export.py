"""`vpd export`: SFT records in the layouts other trainers load as they are.

- ``llamafactory``: LLaMA-Factory's sharegpt layout. ``OUT/<name>.json`` is a JSON list of
  ``{"messages": [{"role", "content"}], "images": [...], "id", "task"}``, each image slot
  of a turn written as an ``<image>`` token where it stands; ``OUT/dataset_info.json`` gets
  (or updates) the ``<name>`` entry (formatting sharegpt, columns messages/images, the role
  tags), keeping the entries of other datasets. Image paths are relative to ``OUT``, the
  ``dataset_dir`` (and default ``media_dir``) LLaMA-Factory resolves them against;
  ``copy_images`` copies them into ``OUT/images/<name>/`` so the folder travels alone.
- ``trl``: TRL's conversational vision format, columns ``messages`` (content as typed
  parts, ``{"type": "image"}`` placeholders) and ``images`` (the pixels, one per
  placeholder), what ``SFTTrainer`` / ``DataCollatorForVisionLanguageModeling`` take.
- ``hf``: the whole record as a Hugging Face dataset: ``id``, ``task``, ``messages``,
  ``images`` and ``meta`` (the record's other keys, as JSON text).

``trl`` and ``hf`` write ``OUT/dataset/`` (``datasets.load_from_disk``) and
``OUT/data/train-*.parquet`` with a ``README.md`` naming them (``datasets.load_dataset(OUT)``);
images are embedded as bytes, so the folder is self-contained.

Every record's images are its ``images`` key when it has one (two-image questions), else
``image``; paths resolve against the SFT file's folder. A record whose image slots and
images disagree gets its one image repeated per slot (as ``vpd tune`` does), else is
rejected, like a record whose image file is missing (``<name>.rejects.jsonl``).

Re-running with the same options and an unchanged SFT file does nothing; a changed SFT
file is exported again; other options need ``force`` (an export is derived data: it is
rewritten whole, written aside first and swapped in, so a kill never leaves half of one).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import ConfigMismatch, VpdError
from vpd.images import ImageChecks, resolve_image
from vpd.options import progress_field
from vpd.progress import progress_bar
from vpd.records import Sft
from vpd.store import (
    RejectWriter,
    atomic_dir,
    atomic_file,
    atomic_write,
    atomic_write_json,
    check_input,
    config_diff,
    read_records,
)

ExportFormat = Literal["llamafactory", "trl", "hf"]
FORMATS: tuple[str, ...] = ("llamafactory", "trl", "hf")
IMAGE_TOKEN = "<image>"  # LLaMA-Factory's image placeholder in sharegpt text
META_NAME = "vpd_export.json"
PARQUET_SHARD_BYTES = 500 << 20
# LLaMA-Factory's sharegpt columns and tags for our role/content messages.
LLAMAFACTORY_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "system_tag": "system",
    },
}


class ExportConfig(BaseModel):
    """Write SFT records in the layout another trainer loads without edits.

    llamafactory: OUT/NAME.json (sharegpt messages with <image> tokens, image paths
    relative to OUT) and the NAME entry of OUT/dataset_info.json. trl: a dataset with
    TRL's `messages` + `images` columns. hf: every field (id, task, messages, images,
    meta). trl and hf write OUT/dataset/ (load_from_disk) and OUT/data/*.parquet
    (load_dataset(OUT)) with the images embedded. Re-running does nothing unless the SFT
    file changed.

    Options of `vpd export`.
    """

    model_config = ConfigDict(extra="forbid")

    sft: Path = Field(description="SFT JSONL (vpd rationalize output).")
    out: Path = Field(
        description="Folder (llamafactory: the dataset_dir, shared with other datasets)."
    )
    fmt: ExportFormat = Field(
        description="llamafactory (sharegpt + dataset_info.json) | trl | hf.",
        json_schema_extra={"flag": "format"},
    )
    name: str = Field(
        "vpd_sft",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Dataset name (LLaMA-Factory's dataset_info key and file name).",
    )
    tasks: list[Literal["answer", "rationale"]] | None = Field(
        None,
        description="Only this task (repeatable; default all).",
        json_schema_extra={"flag": "task"},
    )
    copy_images: bool = Field(
        False, description="llamafactory: copy the images into OUT/images/NAME/."
    )
    force: bool = Field(False, description="Export again when OUT holds other options.")
    progress: bool = progress_field()

    def fingerprint(self) -> dict[str, Any]:
        return {
            "export": "vpd.export/1",
            "sft": str(Path(self.sft).resolve()),
            "fmt": self.fmt,
            "name": self.name,
            "tasks": sorted(self.tasks) if self.tasks else None,
            "copy_images": self.copy_images,
        }


# ----------------------------------------------------------------------------- records


class Item:
    """One SFT record ready to write: its messages as typed parts and its image files."""

    __slots__ = ("record", "messages", "images")

    def __init__(self, record: Sft, messages: list[dict[str, Any]], images: list[Path]) -> None:
        self.record, self.messages, self.images = record, messages, images


def typed_parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as ``[{"type": "text", "text"}, {"type": "image"}]`` parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = []
    for p in content or []:
        if isinstance(p, str):
            parts.append({"type": "text", "text": p})
        elif isinstance(p, dict) and p.get("type") == "image":
            parts.append({"type": "image"})
        elif isinstance(p, dict) and p.get("type") == "text":
            parts.append({"type": "text", "text": str(p.get("text") or "")})
    return parts


def _slots(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def prepare_item(rec: Sft, base: Path, checks: ImageChecks | None = None) -> Item:
    """The record's messages and images; ``ValueError`` with the reason when unusable
    (an image that does not decode too: the exported dataset would fail at that row)."""
    checks = checks if checks is not None else ImageChecks()
    messages = []
    for m in rec.messages:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported role {role!r}")
        messages.append({"role": role, "content": typed_parts(m.get("content"))})
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[-1] != "assistant":
        raise ValueError("the conversation must end with an assistant turn")
    if any(r == roles[i - 1] for i, r in enumerate(roles) if i):
        raise ValueError("user and assistant turns must alternate")
    extra = rec.model_extra or {}
    names = extra.get("images") if isinstance(extra.get("images"), list) else [rec.image]
    images = []
    for name in names:
        p = resolve_image(str(name), base)
        if not p.is_file():
            raise ValueError(f"image not found: {name}")
        why = checks.problem(p)
        if why:
            raise ValueError(why)
        images.append(p.resolve())
    slots = _slots(messages)
    if slots == 0:  # no slot given: the images go before the first user text
        first = next(m for m in messages if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in images] + first["content"]
    elif slots != len(images):
        if len(images) != 1:
            raise ValueError(f"{slots} image slots but {len(images)} images")
        images = images * slots  # one image shown in every slot, as vpd tune does
    return Item(rec, messages, images)


def read_items(cfg: ExportConfig, rejects: RejectWriter) -> Iterator[Item]:
    base = Path(cfg.sft).resolve().parent
    wanted = set(cfg.tasks) if cfg.tasks else None
    prepared: dict[str, Item] = {}
    checks = ImageChecks()

    def check(rec: Sft) -> str | None:
        try:
            prepared[rec.id] = prepare_item(rec, base, checks)
        except ValueError as e:
            return str(e)
        return None

    for rec in read_records(cfg.sft, Sft, rejects=rejects, check=check):
        item = prepared.pop(rec.id)
        if wanted is None or rec.task in wanted:
            yield item


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


# ----------------------------------------------------------------------------- LLaMA-Factory


def sharegpt_text(parts: list[dict[str, Any]]) -> str:
    """Typed parts as one sharegpt string: image slots become ``<image>`` where they stand."""
    out: list[str] = []
    prev = None
    for p in parts:
        if p["type"] == "image":
            out.append(IMAGE_TOKEN)
        else:
            if prev == "text":
                out.append("\n")
            out.append(p["text"])
        prev = p["type"]
    return "".join(out)


def _write_llamafactory(
    cfg: ExportConfig, items: Iterator[Item], bar: Any, counts: Counter[str]
) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "images" / cfg.name
    copied: dict[Path, str] = {}

    def image_ref(p: Path) -> str:
        if not cfg.copy_images:
            return os.path.relpath(p, out.resolve())
        if p not in copied:
            digest = hashlib.blake2b(str(p).encode(), digest_size=8).hexdigest()
            dest = img_dir / f"{digest}{p.suffix.lower() or '.png'}"
            if not dest.exists():
                img_dir.mkdir(parents=True, exist_ok=True)
                with atomic_file(dest) as tmp:
                    shutil.copyfile(p, tmp)
            copied[p] = os.path.relpath(dest, out)
        return copied[p]

    data_file = out / f"{cfg.name}.json"
    with atomic_file(data_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n")
        first = True
        for it in items:
            row = {
                "messages": [
                    {"role": m["role"], "content": sharegpt_text(m["content"])} for m in it.messages
                ],
                "images": [image_ref(p) for p in it.images],
                "id": it.record.id,
                "task": it.record.task,
            }
            f.write(("" if first else ",\n") + json.dumps(row, ensure_ascii=False))
            first = False
            counts[it.record.task] += 1
            bar.advance()
        f.write("\n]\n")
    info_path = out / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise VpdError(f"{info_path} is not valid JSON; fix or remove it") from None
        if not isinstance(info, dict):
            raise VpdError(f"{info_path} must hold a JSON object of dataset entries")
    info[cfg.name] = {"file_name": data_file.name, **LLAMAFACTORY_ENTRY}
    atomic_write(info_path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return {
        "files": [str(data_file), str(info_path)],
        "images_copied": len(copied),
        "load": f"dataset: {cfg.name}, dataset_dir: {out}",
    }


# ----------------------------------------------------------------------------- TRL / HF


def _features(fmt: str) -> Any:
    from datasets import Features, Image, List, Value

    parts = List({"type": Value("string"), "text": Value("string")})
    cols: dict[str, Any] = {}
    if fmt == "hf":
        cols.update(id=Value("string"), task=Value("string"))
    cols["messages"] = List({"role": Value("string"), "content": parts})
    cols["images"] = List(Image())
    if fmt == "hf":
        cols["meta"] = Value("string")
    return Features(cols)


def _row(it: Item, fmt: str, cache: dict[Path, bytes]) -> dict[str, Any]:
    images = []
    for p in it.images:
        if p not in cache:
            if len(cache) > 256:  # neighbouring records share images; keep a few
                cache.clear()
            cache[p] = p.read_bytes()
        images.append({"bytes": cache[p], "path": p.name})
    messages = [
        {
            "role": m["role"],
            "content": [{"type": x["type"], "text": x.get("text")} for x in m["content"]],
        }
        for m in it.messages
    ]
    row: dict[str, Any] = {"messages": messages, "images": images}
    if fmt == "hf":
        rec = it.record
        extra = {k: v for k, v in (rec.model_extra or {}).items() if k != "images"}
        row.update(id=rec.id, task=rec.task, meta=json.dumps(extra, ensure_ascii=False))
    return row


def _card(cfg: ExportConfig, n: int, shards: int) -> str:
    cols = "id, task, messages, images, meta" if cfg.fmt == "hf" else "messages, images"
    # No `configs:` block: datasets (5.2) then keys its cache by the pattern alone and hands
    # one folder's rows to another folder of the same name; data/train-* is found anyway.
    return (
        "---\n"
        f"pretty_name: {cfg.name}\n"
        "---\n"
        f"# {cfg.name}\n\n"
        f"{n} SFT records exported by `vpd export --format {cfg.fmt}` from `{cfg.sft}`,\n"
        f"in {shards} parquet shard(s) under `data/` and as `datasets.save_to_disk` in\n"
        f"`dataset/`. Columns: {cols}; images are embedded.\n\n"
        "```python\n"
        "from datasets import load_dataset, load_from_disk\n"
        f'ds = load_dataset("{cfg.out}", split="train")  # or load_from_disk("{cfg.out}/dataset")\n'
        "```\n"
    )


def _write_dataset(
    cfg: ExportConfig, items: Iterator[Item], bar: Any, counts: Counter[str], staging: Path
) -> dict[str, Any]:
    import datasets
    from datasets import Dataset

    cache: dict[Path, bytes] = {}

    def gen() -> Iterator[dict[str, Any]]:
        for it in items:
            counts[it.record.task] += 1
            bar.advance()
            yield _row(it, cfg.fmt, cache)

    work = staging / ".build"
    # An explicit fingerprint: datasets would otherwise hash (pickle) the generator, and
    # the build cache lives in the staging folder, removed below.
    fingerprint = hashlib.sha256(f"{cfg.fingerprint()}{time.time_ns()}".encode()).hexdigest()
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # our bar counts the records; datasets' would repeat it
    try:
        ds = Dataset.from_generator(
            gen, features=_features(cfg.fmt), cache_dir=str(work), fingerprint=fingerprint[:16]
        )
        ds.save_to_disk(str(staging / "dataset"))
        shards = max(1, math.ceil(ds.data.nbytes / PARQUET_SHARD_BYTES))
        (staging / "data").mkdir()
        for i in range(shards):
            part = ds.shard(shards, i, contiguous=True)
            part.to_parquet(str(staging / "data" / f"train-{i:05d}-of-{shards:05d}.parquet"))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    (staging / "README.md").write_text(_card(cfg, len(ds), shards), encoding="utf-8")
    del ds
    shutil.rmtree(work, ignore_errors=True)
    return {
        "files": [str(cfg.out / "dataset"), str(cfg.out / "data")],
        "parquet_shards": shards,
        "load": f'load_dataset("{cfg.out}", split="train") or load_from_disk("{cfg.out}/dataset")',
    }


# ----------------------------------------------------------------------------- driver


def _sft_digest(path: Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _meta_path(cfg: ExportConfig) -> Path:
    out = Path(cfg.out)
    return out / (f"{cfg.name}.{META_NAME}" if cfg.fmt == "llamafactory" else META_NAME)


def _previous(cfg: ExportConfig) -> dict[str, Any] | None:
    p = _meta_path(cfg)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _export_into(cfg: ExportConfig, dest: Path) -> dict[str, Any]:
    """Write the export's files into ``dest`` (OUT, or the trl/hf staging folder that
    becomes OUT); return its summary."""
    sft, out = Path(cfg.sft), Path(cfg.out)
    counts: Counter[str] = Counter()
    rejects = RejectWriter(
        dest / (f"{cfg.name}.rejects.jsonl" if cfg.fmt == "llamafactory" else "rejects.jsonl")
    )
    with (
        rejects,
        progress_bar(f"export {cfg.fmt}", _count_lines(sft), "record", enabled=cfg.progress) as bar,
    ):
        items = read_items(cfg, rejects)
        first = next(items, None)
        if first is None:  # an empty dataset would only fail later, in a trainer
            why = f"{rejects.count} rejected, reasons in {rejects.path}" if rejects.count else ""
            tasks = f"of task {'/'.join(cfg.tasks)} " if cfg.tasks else ""
            raise VpdError(f"{sft} holds no record {tasks}that can be exported ({why or 'none'})")
        items = itertools.chain([first], items)
        if cfg.fmt == "llamafactory":
            info = _write_llamafactory(cfg, items, bar, counts)
        else:
            info = _write_dataset(cfg, items, bar, counts, dest)
    return {
        "out": str(out),
        "format": cfg.fmt,
        "records": sum(counts.values()),
        "per_task": dict(sorted(counts.items())),
        "rejected": rejects.count,
        # trl/hf: the staged folder becomes OUT, so its rejects file is OUT/rejects.jsonl.
        "rejects_file": str(out / rejects.path.relative_to(dest)) if rejects.count else None,
        **info,
    }


@with_config(ConfigDict(extra="forbid"))
class ExportSummary(TypedDict, total=False):
    """What `vpd export` returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    format: str
    records: int
    per_task: dict[str, int]
    rejected: int
    rejects_file: str | None
    files: list[str]
    images_copied: int
    parquet_shards: int
    load: str
    skipped: bool
    wall_s: float


def run_export(cfg: ExportConfig) -> ExportSummary:
    """Export ``cfg.sft`` to ``cfg.out`` in ``cfg.fmt`` (see the module docstring)."""
    t0 = time.time()
    sft, out = Path(cfg.sft), Path(cfg.out)
    check_input(sft, Sft, "SFT")  # missing, empty or another stage's file: one line, now
    if out.exists() and not out.is_dir():
        raise VpdError(f"--out must be a folder, got a file: {out}")
    fp, digest = cfg.fingerprint(), _sft_digest(sft)
    prev = _previous(cfg)
    if prev is not None and prev.get("config") != fp and not cfg.force:
        raise ConfigMismatch(
            f"{out} holds an export made with other options "
            f"({config_diff(prev.get('config') or {}, fp)}); use "
            "the same options, another --out, or --force to export again"
        )
    if prev is not None and prev.get("config") == fp and prev.get("sft") == digest:
        return {**prev["summary"], "skipped": True, "wall_s": round(time.time() - t0, 3)}
    if cfg.fmt != "llamafactory" and out.is_dir() and any(out.iterdir()) and prev is None:
        raise VpdError(f"{out} is a non-empty folder that is not a vpd export; pick another --out")

    if cfg.fmt == "llamafactory":
        # Its files join OUT, which may hold other datasets: each is written atomically.
        target: Any = contextlib.nullcontext(out)
    else:
        # trl/hf: built aside and swapped in whole (the previous export of this folder is
        # derived, so replaced); a failed attempt is kept for its rejects until the next.
        target = atomic_dir(out, out.with_name(f".{out.name}.partial"), keep_failed=True)
    with target as dest:
        summary = _export_into(cfg, dest)
        meta = {"config": fp, "sft": digest, "summary": summary, "created": time.time()}
        # trl/hf: the meta travels inside the staged folder, so a swapped-in export has it.
        atomic_write_json(dest / _meta_path(cfg).name, meta, indent=2)
    return {**summary, "skipped": False, "wall_s": round(time.time() - t0, 3)}


def summary_line(cfg: ExportConfig, s: dict[str, Any]) -> str:
    """What `vpd export` prints when it is done."""
    if s["skipped"]:
        return f"export {cfg.out}: up to date ({s['records']} records), nothing to do"
    per = ", ".join(f"{n} {t}" for t, n in s["per_task"].items()) or "no records"
    msg = f"export {cfg.fmt} -> {cfg.out}: {s['records']} records ({per}); load with {s['load']}"
    if s["rejected"]:
        msg += f"; {s['rejected']} rejected (reasons in {s['rejects_file']})"
    return msg
