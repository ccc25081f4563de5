"""Import a question set: official benchmark files, or JSONL, JSON, CSV/TSV, HF datasets.

Official formats (``fmt`` gqa, vqav2, okvqa, aokvqa, tallyqa, pope, nlvr2) read the files
as the benchmarks release them; their layouts are in ``vpd.data.official``. The generic
sources below are picked from the path (``fmt`` overrides):

- ``*.jsonl`` (one object a line), ``*.json`` (an array of objects, or JSONL);
- ``*.csv`` / ``*.tsv`` (header row; an answers cell holding a JSON list is parsed);
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``), or any other local folder / ``.parquet`` / ``.arrow``
  file that ``datasets.load_dataset`` reads (never a hub download: only local paths).
  From a ``DatasetDict`` the split read is ``hf_split``, else ``split`` when the dict has
  one of that name, else its only split.

Field mapping: ``image_field``, ``question_field``, ``answers_field``, ``id_field`` (dots
reach into nested dicts, e.g. ``answers.text``). Answers may be a string, a number, a list
of strings, or VQA-style ``[{"answer": ...}, ...]``. An image may be a path (resolved
against ``image_root``, default the input file's folder), a PIL image (HF ``Image``
feature), raw bytes, or ``{"bytes", "path"}``; in-memory images are saved as PNG into
``<out folder>/<out stem>_images/``. Output ``image`` paths are relative to the output's
folder. Other JSON-able columns are kept under ``meta``.

Ids: taken from ``id_field`` when present, else generated stably from the content:
``<dataset>-<blake2b(image reference, question)[:12]>`` so a re-run, or a re-ordered
input, gives the same ids. Bad rows go to ``<out>.rejects.jsonl`` with the reason
(malformed JSON, missing field, empty question, missing image file, unreadable image,
duplicate id) and the run goes on, for every format. The output follows the resume
contract (meta fingerprint, done ids skipped, append + flush).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.data.official import FORMATS as OFFICIAL_FORMATS
from vpd.data.official import open_source
from vpd.data.rows import Row, count_lines, json_rows, jsonable, jsonl_rows
from vpd.errors import VpdError
from vpd.images import ImageChecks
from vpd.options import force_field, progress_field
from vpd.progress import progress_bar
from vpd.records import Question
from vpd.store import StageOutput, atomic_file

Format = Literal[
    "auto", "jsonl", "json", "csv", "tsv", "hf",
    "gqa", "vqav2", "okvqa", "aokvqa", "tallyqa", "pope", "nlvr2",
]  # fmt: skip
GENERIC_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "hf")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HF_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


class ImportConfig(BaseModel):
    """Import questions: official benchmark files as released, or JSONL/CSV/HF datasets.

    Official formats keep the benchmark's question ids, all human answers in order, and
    what you may slice by in meta; test files without answers import with empty answers.
    Bad rows (missing field or image, duplicate id...) go to OUT.rejects.jsonl with the
    reason; the run goes on. Re-running resumes (only missing ids are written).

    Options of `vpd data import` (also the ``data:`` section with ``source: import``).
    """

    input: Path = Field(
        description="Official benchmark file, or JSONL/JSON/CSV/TSV/HF dataset folder."
    )
    out: Path = Field(description="Questions JSONL.")
    fmt: Format = Field(
        "auto",
        description="Official layout: gqa|vqav2|okvqa|aokvqa|tallyqa|pope|nlvr2; generic: "
        "auto|jsonl|json|csv|tsv|hf (auto: from the file name).",
        json_schema_extra={"flag": "format"},
    )
    image_field: str = Field("image", description="Generic: field holding the image path/image.")
    question_field: str = Field("question", description="Generic: field holding the question.")
    answers_field: str = Field("answers", description="Generic: field holding the answer(s).")
    id_field: str = Field("id", description="Generic: field holding the id (generated if absent).")
    split: str | None = Field(None, description="Split name to write (default: the source's).")
    hf_split: str | None = Field(None, description="Generic: split of a DatasetDict.")
    dataset: str | None = Field(
        None, description="Generic: dataset name to write (default: input stem)."
    )
    image_root: Path | None = Field(
        None,
        description=(
            "Folder holding the images (COCO: the split's folder or its parent; "
            "TallyQA: where its relative paths start). Default: the input's folder."
        ),
    )
    annotations: Path | None = Field(
        None, description="vqav2/okvqa: the annotations file (none for test splits)."
    )
    setting: Literal["da", "mc"] | None = Field(
        None, description="aokvqa: da (direct answer, default) or mc (multiple choice)."
    )
    force: bool = force_field()
    progress: bool = progress_field()

    @model_validator(mode="after")
    def _options_fit_format(self) -> ImportConfig:
        official = self.fmt in OFFICIAL_FORMATS
        if self.annotations is not None and self.fmt not in ("vqav2", "okvqa"):
            raise ValueError("annotations is for --format vqav2 or okvqa")
        if self.setting is not None and self.fmt != "aokvqa":
            raise ValueError("setting (da|mc) is for --format aokvqa")
        mapped = {
            "image_field": "image",
            "question_field": "question",
            "answers_field": "answers",
            "id_field": "id",
        }
        changed = [k for k, v in mapped.items() if getattr(self, k) != v]
        if official and (changed or self.hf_split or self.dataset):
            flags = changed + [k for k in ("hf_split", "dataset") if getattr(self, k)]
            raise ValueError(
                f"{', '.join(flags)}: field mapping is for the generic formats; "
                f"--format {self.fmt} reads its official layout"
            )
        return self

    def fingerprint(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"out", "force", "progress"}, mode="json")
        d["input"] = str(Path(self.input).resolve())
        if self.image_root is not None:
            d["image_root"] = str(Path(self.image_root).resolve())
        # Only when set: outputs written before these options existed still resume.
        for key in ("annotations", "setting"):
            if d[key] is None:
                del d[key]
        if self.annotations is not None:
            d["annotations"] = str(Path(self.annotations).resolve())
        return {"importer": "vpd.data.importer/1", **d}


# ----------------------------------------------------------------------------- row sources


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in _HF_FILE_SUFFIXES:
        return "hf"
    raise VpdError(
        f"cannot tell the format of {path} (expected .jsonl, .json, .csv, .tsv, .parquet, "
        ".arrow or a dataset folder); pass --format"
    )


def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, (1 << 31) - 1))
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            return
        for row in reader:
            raw = json.dumps(row, ensure_ascii=False)
            if None in row:  # more cells than header columns
                yield Row(reader.line_num, None, raw, "row has more cells than the header")
                continue
            data = {k: v for k, v in row.items() if v is not None}
            yield Row(reader.line_num, data, raw)


def _load_hf(path: Path, hf_split: str | None, split: str | None) -> tuple[Any, str | None]:
    """Load a local HF dataset; returns (Dataset, name of the split read)."""
    import datasets

    try:
        if path.is_dir() and any((path / m).exists() for m in _HF_MARKERS):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            ds = datasets.load_dataset(
                _HF_FILE_SUFFIXES.get(path.suffix.lower(), "parquet"), data_files=str(path)
            )
        else:
            ds = datasets.load_dataset(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise VpdError(f"cannot load a dataset from {path}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        want = hf_split or (split if split in ds else None)
        if want is None:
            if len(names) != 1:
                raise VpdError(f"{path} has splits {names}; choose one with --hf-split")
            want = names[0]
        if want not in ds:
            raise VpdError(f"{path}: no split {want!r}; it has {names}")
        return ds[want], want
    if hf_split:
        raise VpdError(f"{path} is a single dataset, not a DatasetDict; drop --hf-split")
    return ds, None


def _hf_rows(ds: Any, split_name: str | None) -> Iterator[Row]:
    for i, row in enumerate(ds, 1):
        yield Row(i, row, hf_split=split_name)


# ----------------------------------------------------------------------------- fields


_MISSING = object()


def get_field(data: dict[str, Any], name: str) -> Any:
    """``data[name]``, or a dotted path into nested dicts; ``_MISSING`` when absent."""
    if name in data:
        return data[name]
    cur: Any = data
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def normalize_answers(value: Any) -> list[str]:
    """str | number | list[str] | [{"answer": ...}] | {"text": [...]} -> list[str].

    Raises ``ValueError`` with a reason for anything else.
    """
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):  # a JSON list in a CSV cell
            try:
                return normalize_answers(json.loads(s))
            except (json.JSONDecodeError, ValueError):
                pass
        return [s] if s else []
    if isinstance(value, bool):
        return ["yes" if value else "no"]
    if isinstance(value, int | float):
        return [str(int(value)) if float(value).is_integer() else str(value)]
    if isinstance(value, dict):
        for key in ("answer", "text", "answers"):
            if key in value:
                return normalize_answers(value[key])
        raise ValueError(f"answers dict without an 'answer' or 'text' key: {list(value)}")
    if isinstance(value, list | tuple):
        out: list[str] = []
        for item in value:
            out.extend(normalize_answers(item))
        return out
    raise ValueError(f"answers must be a string, number or list, got {type(value).__name__}")


def _stable_id(dataset: str, image_ref: str, question: str) -> str:
    h = hashlib.blake2b(f"{image_ref}\0{question}".encode(), digest_size=6).hexdigest()
    return f"{dataset}-{h}"


def _safe_name(rid: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", rid)[:80]
    # The hash keeps two ids that sanitize alike (a/b vs a_b) from sharing a file.
    return f"{base}-{hashlib.blake2b(rid.encode(), digest_size=4).hexdigest()}.png"


# ----------------------------------------------------------------------------- import


class _Importer:
    def __init__(self, cfg: ImportConfig) -> None:
        self.cfg = cfg
        self.input = Path(cfg.input)
        self.out = Path(cfg.out)
        self.out_dir = self.out.parent.resolve()
        self.image_root = Path(cfg.image_root) if cfg.image_root else self.input.parent
        self.checks = ImageChecks()  # many questions share an image: decode its header once
        if self.input.is_dir() and cfg.image_root is None:
            self.image_root = self.input
        self.dataset = cfg.dataset or self.input.stem
        self.img_dir = self.out_dir / f"{self.out.stem}_images"
        self.images_saved = 0

    def image(self, value: Any, rid: str) -> str:
        """Output-relative image path for a row's image value; ``ValueError`` = reject."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return self._save(value["bytes"], rid)
            value = value.get("path")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"empty image field {self.cfg.image_field!r}")
        if isinstance(value, bytes | bytearray):
            return self._save(bytes(value), rid)
        if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image
            return self._save(value, rid)
        if not isinstance(value, str):
            raise ValueError(f"image must be a path, image or bytes, got {type(value).__name__}")
        p = Path(value).expanduser()
        if not p.is_absolute():
            p = self.image_root / p
        if not p.is_file():
            raise ValueError(f"missing image file: {p}")
        why = self.checks.problem(p)
        if why:  # a trainer would crash at this row hours later
            raise ValueError(why)
        return os.path.relpath(p.resolve(), self.out_dir)

    def images(self, value: Any, rid: str) -> list[str]:
        return [self.image(value, rid)]

    def row_id(self, row: Row) -> str | None:
        raw_id = get_field(row.data or {}, self.cfg.id_field)
        return str(raw_id) if isinstance(raw_id, str | int) else None

    def _save(self, img: Any, rid: str) -> str:
        from PIL import Image, UnidentifiedImageError

        dest = self.img_dir / _safe_name(rid)
        if not dest.exists():  # a resumed run keeps what it already saved
            if isinstance(img, bytes):
                try:
                    img = Image.open(io.BytesIO(img))
                    img.load()
                except (UnidentifiedImageError, OSError) as e:
                    raise ValueError(f"unreadable image bytes: {e}") from None
            if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16"):
                img = img.convert("RGB")
            self.img_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(dest) as tmp:
                img.save(tmp, format="PNG")
            self.images_saved += 1
        return os.path.relpath(dest, self.out_dir)

    def rows(self) -> tuple[Iterator[Row], int | None]:
        fmt = self.cfg.fmt if self.cfg.fmt != "auto" else detect_format(self.input)
        if fmt == "hf":
            import datasets

            ds, name = _load_hf(self.input, self.cfg.hf_split, self.cfg.split)
            feat = ds.features.get(self.cfg.image_field)
            if isinstance(feat, datasets.Image) and feat.decode:
                # Raw bytes: rows that are rejected or already done cost no image decode.
                ds = ds.cast_column(self.cfg.image_field, datasets.Image(decode=False))
            return _hf_rows(ds, name), len(ds)
        if self.input.is_dir():
            raise VpdError(f"{self.input} is a folder; --format {fmt} needs a file")
        total = count_lines(self.input)
        if fmt == "jsonl":
            return jsonl_rows(self.input), total
        if fmt == "json":
            return json_rows(self.input), None
        return _csv_rows(self.input, "\t" if fmt == "tsv" else ","), max(total - 1, 0)

    def prepare(self, row: Row) -> tuple[str, Any, dict[str, Any]]:
        """(id, raw image value, other Question fields) of a row; ``ValueError`` = reject.

        The image is resolved later, so duplicate and already-done rows cost no image I/O.
        """
        cfg, data = self.cfg, row.data or {}
        q = get_field(data, cfg.question_field)
        if q is _MISSING:
            raise ValueError(f"missing field {cfg.question_field!r}")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"empty question in field {cfg.question_field!r}")
        img = get_field(data, cfg.image_field)
        if img is _MISSING:
            raise ValueError(f"missing field {cfg.image_field!r}")
        ans = get_field(data, cfg.answers_field)
        if ans is _MISSING:
            raise ValueError(f"missing field {cfg.answers_field!r}")
        answers = normalize_answers(ans)
        if not answers:
            raise ValueError(f"no answers in field {cfg.answers_field!r}")
        rid = get_field(data, cfg.id_field)
        if rid is _MISSING or rid is None or (isinstance(rid, str) and not rid.strip()):
            ref = img if isinstance(img, str) else row.raw
            rid = _stable_id(self.dataset, ref, q.strip())
        rid = str(rid).strip()
        used = {cfg.question_field, cfg.image_field, cfg.answers_field, cfg.id_field}
        used |= {"meta", "dataset", "split"}
        meta = {k: v for k, v in data.items() if k not in used and jsonable(v)}
        if isinstance(data.get("meta"), dict) and jsonable(data["meta"]):
            meta = {**data["meta"], **meta}
        split = cfg.split or (data.get("split") if isinstance(data.get("split"), str) else None)
        fields = {
            "question": q.strip(),
            "answers": answers,
            "dataset": str(data.get("dataset") or self.dataset),
            "split": split or row.hf_split or "",
            "meta": {**meta, "source_line": row.line},
        }
        return rid, img, fields


def _source(cfg: ImportConfig) -> Any:
    """The row source for ``cfg.fmt``: an official layout, or the generic importer."""
    if cfg.fmt in OFFICIAL_FORMATS:
        if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
            raise VpdError(f"--image-root is not a directory: {cfg.image_root}")
        if cfg.annotations is not None and not Path(cfg.annotations).is_file():
            raise VpdError(f"annotations file not found: {cfg.annotations}")
        return open_source(
            cfg.fmt,
            Path(cfg.input),
            out_dir=Path(cfg.out).parent,
            image_root=cfg.image_root,
            annotations=cfg.annotations,
            split=cfg.split,
            setting=cfg.setting,
        )
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise VpdError(f"--image-root is not a directory: {cfg.image_root}")
    return _Importer(cfg)


@with_config(ConfigDict(extra="forbid"))
class ImportSummary(TypedDict, total=False):
    """What `vpd data import` returns.

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    format: str
    read: int
    written: int
    already_done: int
    rejected: int
    images_saved: int
    rejects: str | None
    wall_s: float
    rows_per_s: float


def run_import(cfg: ImportConfig) -> ImportSummary:
    """Import ``cfg.input`` into ``cfg.out`` (question JSONL), resumably."""
    t0 = time.time()
    src = Path(cfg.input)
    if not src.exists():
        raise VpdError(f"input not found: {src}")
    imp = _source(cfg)
    rows, total = imp.rows()
    first = next(rows, None)
    if first is None:  # checked before OUT is made: an empty input writes nothing
        raise VpdError(f"input {src} holds no rows (it is empty)")
    rows = itertools.chain([first], rows)
    seen: set[str] = set()
    counts = {"read": 0, "written": 0, "already_done": 0, "rejected": 0}
    with (
        StageOutput(cfg.out, cfg.fingerprint(), force=cfg.force) as so,
        progress_bar("import", total, "row", enabled=cfg.progress) as bar,
    ):

        def reject(row: Row, reason: str, rid: str | None = None) -> None:
            so.rejects.write(row.line, reason, row.raw, rid)
            counts["rejected"] += 1

        for row in rows:
            counts["read"] += 1
            bar.advance()
            if row.error is not None:
                reject(row, row.error)
                continue
            try:
                rid, img, fields = imp.prepare(row)
            except ValueError as e:
                reject(row, str(e), imp.row_id(row))
                continue
            if rid in seen:
                reject(row, f"duplicate id {rid!r}", rid)
                continue
            seen.add(rid)
            if so.done(rid):
                counts["already_done"] += 1
                continue
            try:
                images = imp.images(img, rid)
            except ValueError as e:
                reject(row, str(e), rid)
                continue
            if len(images) > 1:  # two-image questions (NLVR2): image = the first
                fields["meta"] = {**fields["meta"], "images": images}
            so.write(Question(id=rid, image=images[0], **fields))
            counts["written"] += 1
    wall = time.time() - t0
    return {
        "out": str(cfg.out),
        "format": cfg.fmt,
        **counts,
        "images_saved": getattr(imp, "images_saved", 0),
        "rejects": str(so.rejects.path) if counts["rejected"] else None,
        "wall_s": round(wall, 3),
        "rows_per_s": round(counts["read"] / max(wall, 1e-9), 1),
    }


def summary_line(cfg: ImportConfig, s: dict[str, Any]) -> str:
    """What `vpd data import` prints when it is done."""
    msg = (
        f"import {cfg.input} -> {cfg.out}: {s['written']} written, {s['already_done']} "
        f"already done, {s['rejected']} rejected"
    )
    return msg + (f" (reasons in {s['rejects']})" if s["rejects"] else "")
