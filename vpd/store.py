"""Resumable JSONL storage: the resume contract every stage follows.

- outputs are append-only; a record is written whole, flushed, fsync'd at batch ends;
- on start the output's done ids are read (streaming; ids kept as 64-bit hashes so a
  million-line file costs a few MB), and a torn last line from a kill is cut off;
- ``--shard i/n`` assigns work by a stable hash of a key (the question id);
- ``<out>.meta.json`` fingerprints the run config; resuming under another config is
  an error unless ``force`` (then the old output is moved aside, never mixed);
- bad input lines go to ``<out>.rejects.jsonl`` with a reason; the run goes on;
- every whole-file or whole-folder output (meta, markers, summaries, reports, images,
  exports, cached builds) is written beside its place and renamed into it
  (:func:`atomic_file`, :func:`atomic_write`, :func:`atomic_dir`): a kill leaves the old
  one or the new one, never half of one. Nothing else in the package calls ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpd.errors import ConfigMismatch, VpdError
from vpd.records import (
    Record,
    Reject,
    guess_record_model,
    kind_name,
    record_model_for,
    wrong_kind,
)

M = TypeVar("M", bound=BaseModel)

_ID_PREFIX = '{"id":'
_DECODER = json.JSONDecoder()


# --------------------------------------------------------------------------- hashing / shards


def stable_hash(key: str) -> int:
    """64-bit hash that is the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, key: str) -> bool:
        return stable_hash(key) % self.count == self.index


def parse_shard(spec: str | None) -> Shard | None:
    """Parse ``"i/n"`` (0 <= i < n); ``None`` or ``""`` means no sharding."""
    if not spec:
        return None
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise VpdError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise VpdError(f"--shard {spec}: need 0 <= i < n and n >= 1")
    return Shard(i, n)


def in_shard(key: str, shard: Shard | None) -> bool:
    return shard is None or shard.owns(key)


# --------------------------------------------------------------------------- done ids


def _sorted_unique(hashes: np.ndarray) -> np.ndarray:
    """Sort + drop repeats; np.unique is ~80x slower and takes ~3x the memory on 1M ids."""
    h = np.array(hashes, dtype=np.uint64)  # a private copy, sorted in place
    h.sort()
    if len(h) < 2:
        return h
    keep = np.empty(len(h), dtype=bool)
    keep[0] = True
    np.not_equal(h[1:], h[:-1], out=keep[1:])
    return h if keep.all() else h[keep]


class DoneIds:
    """A set of ids stored as sorted 64-bit hashes: ~8 bytes per id, O(log n) lookup.

    Collisions are negligible at pipeline scale (2^-64 per pair).
    """

    def __init__(self, hashes: np.ndarray | None = None) -> None:
        self._sorted = _sorted_unique(hashes) if hashes is not None else np.empty(0, np.uint64)
        self._recent: set[int] = set()

    def __contains__(self, key: str) -> bool:
        h = stable_hash(key)
        if h in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        return i < len(self._sorted) and int(self._sorted[i]) == h

    def add(self, key: str) -> None:
        self._recent.add(stable_hash(key))

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)


def _line_id(line: str) -> str | None:
    """The record id of a JSONL line, quickly when the writer put ``id`` first."""
    if line.startswith(_ID_PREFIX):
        j = len(_ID_PREFIX)
        while j < len(line) and line[j] == " ":
            j += 1
        try:
            value, _ = _DECODER.raw_decode(line, j)
            if isinstance(value, str):
                return value
        except json.JSONDecodeError:
            return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None


def iter_ids(path: Path) -> Iterator[str]:
    """Stream the ids of complete records in ``path`` (a torn last line is skipped)."""
    path = Path(path)  # str paths too, like the rest of the store API
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn tail from a kill: not a complete record
            rid = _line_id(line)
            if rid is not None:
                yield rid


def read_done_ids(path: Path, chunk: int = 1 << 16) -> DoneIds:
    """Read the done ids of an output file in constant memory beyond 8 bytes per id."""
    parts: list[np.ndarray] = []
    buf = np.empty(chunk, np.uint64)
    n = 0
    for rid in iter_ids(path):
        buf[n] = stable_hash(rid)
        n += 1
        if n == chunk:
            parts.append(buf.copy())
            n = 0
    parts.append(buf[:n].copy())
    return DoneIds(np.concatenate(parts))


def repair_torn_tail(path: Path) -> int:
    """Cut a partial last line (written when the process was killed); return bytes cut."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline; blocks keep this cheap for big files.
        pos, block = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            data = f.read(pos - start)
            k = data.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


# --------------------------------------------------------------------------- reading


class RejectWriter:
    """Writes ``<out>.rejects.jsonl``; regenerated on every run since inputs are re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._f = None

    def write(self, line: int, reason: str, raw: str, rid: str | None = None) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        rec = Reject(line=line, id=rid, reason=reason, raw=raw[:2000])
        self._f.write(rec.model_dump_json() + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        elif self.path.exists():
            self.path.unlink()  # a clean run leaves no stale rejects from an earlier one

    def __enter__(self) -> RejectWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pretty_validation(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class _KindCheck:
    """Refuses a file of another record type: its first record decides (the whole file is
    the wrong one, e.g. executions given for verified programs), later ones are rejected."""

    def __init__(self, path: Path, model: type[Any]) -> None:
        self.path, self.model, self.first = path, model, True

    def __call__(self, obj: dict[str, Any]) -> str | None:
        other = wrong_kind(obj, self.model)
        first, self.first = self.first, False
        if other is None:
            return None
        if first:
            raise VpdError(
                f"{self.path} holds {kind_name(other)}, but this input takes "
                f"{kind_name(self.model)}"
            )
        return f"a record of {kind_name(other)}, not of {kind_name(self.model)}"


def _empty_input(path: Path, label: str) -> VpdError:
    return VpdError(f"{label} file {path} holds no records (it is empty)")


def check_input(
    path: Path, model: type[Any], label: str = "input", allow_empty: bool = False
) -> None:
    """Refuse a missing, empty or wrong-type input before a stage starts its expensive
    part (a sandbox pool, a model): the checks :func:`read_records` makes, on line one."""
    path = Path(path)
    if not path.exists():
        raise VpdError(f"{label} file not found: {path}")
    if path.is_dir():
        raise VpdError(f"expected a JSONL file for {label}, got a directory: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        if allow_empty:
            return
        raise _empty_input(path, label)
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return  # a bad line is the rejects file's business
    if isinstance(obj, dict):
        _KindCheck(path, model)(obj)


def read_records(
    path: Path,
    model: type[M],
    rejects: RejectWriter | None = None,
    check: Callable[[M], str | None] | None = None,
    allow_empty: bool = False,
) -> Iterator[M]:
    """Stream validated records; bad lines go to ``rejects`` with a reason.

    ``check`` may return an extra reason to reject a well-formed record (e.g. a
    missing image file). Duplicate ids after the first are rejected too. A file of
    another record type, or (unless ``allow_empty``) one with no line at all, is a
    VpdError before any record is yielded.
    """
    path = Path(path)
    if not path.exists():
        raise VpdError(f"input file not found: {path}")
    if path.is_dir():
        raise VpdError(f"expected a JSONL file, got a directory: {path}")
    seen = DoneIds()
    kind = _KindCheck(path, model)
    lines = 0

    def reject(lineno: int, reason: str, raw: str, rid: str | None = None) -> None:
        if rejects is not None:
            rejects.write(lineno, reason, raw, rid)

    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue
            lines += 1
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                reject(lineno, f"malformed JSON: {e.msg} at column {e.colno}", raw)
                continue
            if not isinstance(obj, dict):
                reject(lineno, f"expected a JSON object, got {type(obj).__name__}", raw)
                continue
            rid = obj.get("id") if isinstance(obj.get("id"), str) else None
            why = kind(obj)
            if why:
                reject(lineno, why, raw, rid)
                continue
            try:
                rec = model.model_validate(obj)
            except ValidationError as e:
                reject(lineno, f"invalid record: {_pretty_validation(e)}", raw, rid)
                continue
            rid = getattr(rec, "id", None)
            if rid is not None:
                if rid in seen:
                    reject(lineno, f"duplicate id {rid!r}", raw, rid)
                    continue
                seen.add(rid)
            if check is not None:
                why = check(rec)
                if why:
                    reject(lineno, why, raw, rid)
                    continue
            yield rec
    if not lines and not allow_empty:
        raise _empty_input(path, "input")


# --------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------- input indexing


class LabelledRejects:
    """Prefix reject reasons with the input they came from (three inputs, one rejects file)."""

    def __init__(self, rejects: Any, label: str) -> None:
        self.rejects, self.label = rejects, label

    def write(self, line: int, reason: str, raw: str, rid: str | None = None) -> None:
        self.rejects.write(line, f"{self.label}: {reason}", raw, rid)


def scan_jsonl(
    path: Path, model: type[Any], rejects: Any, label: str, allow_empty: bool = False
) -> Iterator[tuple[Any, int, int]]:
    """Stream ``(record, byte offset, line number)`` of a JSONL file; bad lines are rejected.

    Offsets let a stage index a big input in a few bytes per record and load each
    record again (``load_at``) only when its question is processed. A last line with
    no newline that does not parse is a file still being written: skipped, not rejected.
    """
    path = Path(path)
    if not path.exists():
        raise VpdError(f"{label} file not found: {path}")
    if path.is_dir():
        raise VpdError(f"expected a JSONL file for {label}, got a directory: {path}")
    seen: set[str] = set()
    kind = _KindCheck(path, model)
    offset = lines = 0
    with open(path, "rb") as f:
        for lineno, bline in enumerate(f, 1):
            start, offset = offset, offset + len(bline)
            raw = bline.decode("utf-8", errors="replace").rstrip("\n")
            if not raw.strip():
                continue
            lines += 1
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                if not bline.endswith(b"\n"):
                    break
                rejects.write(lineno, f"{label}: malformed JSON: {e.msg}", raw)
                continue
            if not isinstance(obj, dict):
                rejects.write(lineno, f"{label}: expected a JSON object", raw)
                continue
            rid = obj.get("id") if isinstance(obj.get("id"), str) else None
            other = kind(obj)
            if other:
                rejects.write(lineno, f"{label}: {other}", raw, rid)
                continue
            try:
                rec = model.model_validate(obj)
            except ValidationError as e:
                why = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc']) or 'record'}: {err['msg']}"
                    for err in e.errors()
                )
                rejects.write(lineno, f"{label}: invalid record: {why}", raw, rid)
                continue
            if rec.id in seen:
                rejects.write(lineno, f"{label}: duplicate id {rec.id!r}", raw, rec.id)
                continue
            seen.add(rec.id)
            yield rec, start, lineno
    if not lines and not allow_empty:
        raise _empty_input(path, label)


def load_at(f: Any, offset: int, model: type[Any]) -> Any:
    """Re-read the record that ``scan_jsonl`` found at ``offset`` of the open binary file."""
    f.seek(offset)
    return model.model_validate_json(f.readline())


class JsonlWriter:
    """Append-only writer: one complete line per record, flushed; fsync on ``sync``."""

    def __init__(self, path: Path, fsync_every: int = 256) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._fsync_every = fsync_every
        self._since_sync = 0
        self.written = 0

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        if isinstance(record, BaseModel):
            line = record.model_dump_json()
        else:
            line = json.dumps(record, ensure_ascii=False)
        # Our records start with "id" (first declared field), which keeps id scans fast.
        self._f.write(line + "\n")
        self._f.flush()
        self.written += 1
        self._since_sync += 1
        if self._since_sync >= self._fsync_every:
            self.sync()

    def write_line(self, line: str) -> None:
        """Append an already-serialized record (must end with a newline)."""
        self._f.write(line)
        self._f.flush()
        self.written += 1

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._since_sync = 0

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- atomic outputs


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield ``<path>.tmp`` (same folder, so the rename cannot cross filesystems) to write;
    when the block ends cleanly it replaces ``path`` in one rename, on an error it is
    removed and ``path`` stays as it was. For writers that want a path (PIL's ``save``,
    ``shutil.copyfile``) or a stream (``open(tmp, "w")`` inside the block)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block failed


def atomic_write(path: Path | str, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write a whole file (text or bytes) atomically: see :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding=encoding)


def atomic_write_json(path: Path | str, obj: Any, **dumps: Any) -> None:
    """``json.dumps(obj, **dumps)`` written atomically (each caller keeps its own layout)."""
    atomic_write(path, json.dumps(obj, **dumps))


@contextlib.contextmanager
def atomic_dir(
    out: Path | str, staging: Path | None = None, keep_failed: bool = False
) -> Iterator[Path]:
    """Yield an empty folder beside ``out`` to fill; when the block ends cleanly it
    replaces ``out`` whole (a previous ``out`` is removed: it is what is being rebuilt).

    ``staging`` names that folder (one a killed attempt left is cleared first); by default
    it is a fresh hidden one (``.<name>.XXXX``). On an error it is removed, unless
    ``keep_failed`` (then what the attempt wrote, e.g. its rejects, can be read until the
    next attempt clears it).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    else:
        tmp = Path(staging)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    done = False
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        done = True
    finally:
        if not done and not keep_failed and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def set_aside(path: Path | str, stamp: str | None = None) -> Path:
    """Rename ``path`` (a file or a folder) to ``<path>.<stamp>.bak`` and return the new
    name: what ``--force`` does to an output made under other options (kept, never mixed)."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.{stamp or time.strftime('%Y%m%d-%H%M%S')}.bak")
    path.rename(dest)
    return dest


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> str:
    """The options that differ between two fingerprints, for a mismatch message:
    ``key: old -> new, ...`` (the first ``limit`` of them)."""
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(parts[:limit]) + (" ..." if len(parts) > limit else "")


# --------------------------------------------------------------------------- meta


def meta_path(out: Path) -> Path:
    return Path(str(out) + ".meta.json")


def rejects_path(out: Path) -> Path:
    return Path(str(out) + ".rejects.jsonl")


def _canon(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def ensure_meta(out: Path, config: dict[str, Any], force: bool = False) -> None:
    """Record ``config`` beside ``out``; refuse to resume ``out`` under another config.

    With ``force`` a mismatching output (and its meta) is moved aside to
    ``<out>.<timestamp>.bak`` so the new run starts clean and nothing is lost.
    """
    out = Path(out)
    mp = meta_path(out)
    config = _canon(config)
    if mp.exists() and out.exists():
        try:
            old = json.loads(mp.read_text(encoding="utf-8")).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            old = None
        if old != config:
            if not force:
                diff = config_diff(old or {}, config)
                raise ConfigMismatch(
                    f"{out} was written with a different config ({diff}); use the same "
                    "options to resume, another --out, or --force to start over "
                    "(the old output is kept as a .bak file)"
                )
            stamp = time.strftime("%Y%m%d-%H%M%S")
            set_aside(out, stamp)
            set_aside(mp, stamp)
    elif mp.exists() and not out.exists():
        mp.unlink()
    if not mp.exists():
        mp.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": config, "created": time.time()}
        atomic_write_json(mp, meta, indent=2, sort_keys=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON file (a marker, a summary, a report), or None if missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_meta(out: Path) -> dict[str, Any] | None:
    mp = meta_path(Path(out))
    if not mp.exists():
        return None
    return json.loads(mp.read_text(encoding="utf-8")).get("config")


# --------------------------------------------------------------------------- stage output


class StageOutput:
    """Everything a stage needs to honour the resume contract for one output file.

    >>> with StageOutput(out, config, shard=parse_shard("0/2")) as so:
    ...     for q in questions:
    ...         if so.owns(q.id) and not so.done(rid):
    ...             so.write(record)
    """

    def __init__(
        self,
        out: Path,
        config: dict[str, Any],
        *,
        shard: Shard | None = None,
        force: bool = False,
    ) -> None:
        self.out = Path(out)
        if self.out.is_dir():
            raise VpdError(f"--out must be a file path, got a directory: {self.out}")
        cfg = dict(config)
        if shard is not None:
            cfg["shard"] = str(shard)
        ensure_meta(self.out, cfg, force=force)
        self.torn_bytes = repair_torn_tail(self.out)
        self.shard = shard
        self.done_ids = read_done_ids(self.out)
        self.already = len(self.done_ids)
        self.rejects = RejectWriter(rejects_path(self.out))
        self._writer: JsonlWriter | None = None

    def owns(self, key: str) -> bool:
        return in_shard(key, self.shard)

    def done(self, rid: str) -> bool:
        return rid in self.done_ids

    def write(self, record: BaseModel | dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = JsonlWriter(self.out)
        self._writer.write(record)
        rid = record.id if isinstance(record, BaseModel) else record["id"]
        self.done_ids.add(rid)

    def write_line(self, rid: str, line: str) -> None:
        """Append a record already serialized as one JSONL line (used by merge)."""
        if self._writer is None:
            self._writer = JsonlWriter(self.out)
        self._writer.write_line(line)
        self.done_ids.add(rid)

    def sync(self) -> None:
        if self._writer is not None:
            self._writer.sync()

    @property
    def written(self) -> int:
        return self._writer.written if self._writer is not None else 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.rejects.close()

    def __enter__(self) -> StageOutput:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()
        if exc_type is None and not self.out.exists():
            # A stage that finished with nothing to write (a shard that owns no question)
            # leaves an empty file, which the next stage reads, not a missing one.
            self.out.touch()


# --------------------------------------------------------------------------- merge

# What a stage writes beside its output X.jsonl (X.jsonl.meta.json, .rejects.jsonl,
# .judge.jsonl, .funnel.json, .<stamp>.bak, ...): a glob like `samples.*.jsonl` matches
# some of them, and merging one would put a reject or a cache entry among the records.
_SIDE_SUFFIXES = (".meta.json", ".rejects.jsonl", ".bak", ".tmp")


def is_side_file(path: Path) -> bool:
    """Whether ``path`` is a file written beside a JSONL output rather than an output."""
    name = Path(path).name
    return name.endswith(_SIDE_SUFFIXES) or ".jsonl." in name


@dataclass
class MergeSummary:
    """What one `vpd merge` did, for its summary line."""

    inputs: list[Path]  # the files merged
    skipped: list[Path]  # side files among the inputs, never merged
    record: str  # the record model every line was checked against
    source: str  # how that model was found: the inputs' meta, their fields, or neither
    written: int = 0  # new records appended to the output
    duplicates: int = 0  # lines whose id the output (or an earlier input) already held
    rejected: int = 0  # bad lines, written to ``rejects``
    unfinished: int = 0  # inputs whose last line is still being written: the next merge takes it
    rejects: Path | None = None

    def line(self, out: Path) -> str:
        """What `vpd merge` prints when it is done."""
        msg = (
            f"merged {len(self.inputs)} files into {out}: {self.written} new records, "
            f"{self.duplicates} duplicates skipped, {self.rejected} rejected"
        )
        if self.rejects is not None:
            msg += f" (reasons in {self.rejects})"
        if self.unfinished:
            msg += f", {self.unfinished} unfinished last lines left for the next merge"
        if self.skipped:
            names = ", ".join(p.name for p in self.skipped[:3])
            msg += f"; {len(self.skipped)} side files skipped ({names}"
            msg += ", ...)" if len(self.skipped) > 3 else ")"
        return msg + f"; checked as {self.record} records ({self.source})"


def _first_object(path: Path, limit: int = 1000) -> dict[str, Any] | None:
    """The first line of ``path`` whose fields name a record type (None: none in ``limit``)."""
    with open(path, "rb") as f:
        for bline in itertools.islice(f, limit):
            try:
                obj = json.loads(bline)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(obj, dict) and guess_record_model(obj) is not None:
                return obj
    return None


def _merge_model(
    inputs: list[Path], configs: dict[Path, dict[str, Any]]
) -> tuple[type[Record], str]:
    """The record model of the inputs, and how it was found.

    The meta file names the stage that wrote a shard, and with it the record model: that
    wins. An input without meta is judged by its first record's fields; all must agree, so
    a glob that caught another stage's files is an error, not a mix.
    """
    found: dict[type[Record], Path] = {}
    by_meta = False
    for p in inputs:
        model = record_model_for(configs[p]) if p in configs else None
        if model is not None:
            by_meta = True
        else:
            obj = _first_object(p)
            model = guess_record_model(obj) if obj is not None else None
        if model is not None:
            found.setdefault(model, p)
    if len(found) > 1:
        (m1, p1), (m2, p2) = list(found.items())[:2]
        raise VpdError(
            f"cannot merge {p1} ({m1.__name__} records) with {p2} ({m2.__name__} records)"
        )
    if found:
        return next(iter(found)), "by the inputs' meta" if by_meta else "by their fields"
    return Record, "id only: no meta or fields name a record type"


def _merge_file(path: Path, model: type[Record], so: StageOutput, summary: MergeSummary) -> None:
    """Append the valid records of ``path`` that ``so`` lacks; reject its bad lines."""
    rejects = LabelledRejects(so.rejects, str(path))
    with open(path, "rb") as f:
        for lineno, bline in enumerate(f, 1):
            # A last line without a newline that does not parse is a shard still writing:
            # left for the next merge. One that parses is a whole record (a hand-made file).
            complete = bline.endswith(b"\n")
            try:
                line = bline.decode("utf-8")
            except UnicodeDecodeError as e:
                if not complete:
                    summary.unfinished += 1
                    break
                raw = bline.decode("utf-8", errors="replace").rstrip("\n")
                rejects.write(lineno, f"not UTF-8 text (byte {e.start})", raw)
                continue
            if not line.strip():
                continue
            rid = _line_id(line)
            if rid is not None and so.done(rid):
                summary.duplicates += 1  # merged before (resume) or in an earlier input
                continue
            try:  # parse and check in one pass (pydantic's parser: 1.8x json.loads + check)
                rec: Record = model.model_validate_json(line)
            except ValidationError:
                # A bad line (or one only Python's parser reads, e.g. NaN): say why.
                raw = line.rstrip("\n")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if not complete:
                        summary.unfinished += 1
                        break
                    rejects.write(lineno, f"malformed JSON: {e.msg} at column {e.colno}", raw)
                    continue
                if not isinstance(obj, dict):
                    why = f"expected a JSON object, got {type(obj).__name__}"
                    rejects.write(lineno, why, raw)
                    continue
                try:
                    rec = model.model_validate(obj)
                except ValidationError as e:
                    rid = obj.get("id") if isinstance(obj.get("id"), str) else None
                    why = f"invalid {model.__name__} record: {_pretty_validation(e)}"
                    rejects.write(lineno, why, raw, rid)
                    continue
            # The line itself, not a re-serialization: merged bytes are the shard's bytes.
            so.write_line(rec.id, line if complete else line + "\n")
            summary.written += 1


def merge(
    out: Path, inputs: Iterable[Path], force: bool = False, allow_empty: bool = False
) -> MergeSummary:
    """Join shard outputs into ``out`` without duplicate ids.

    Every line is checked against the record model of the stage that wrote the inputs
    (see ``_merge_model``); a bad line goes to ``<out>.rejects.jsonl`` with its input,
    line number and reason. Side files among the inputs (``*.rejects.jsonl``,
    ``*.meta.json``, ...) are skipped. Shard outputs must share one config (apart from
    the shard itself); the merged meta is that config. Re-running after a new shard
    finished appends only its new ids. Inputs with no valid record are an error unless
    ``allow_empty`` (then ``out`` exists, empty if it was new).
    """
    out = Path(out)
    given = [Path(p) for p in inputs]
    skipped = [p for p in given if is_side_file(p)]
    files = [p for p in given if not is_side_file(p)]
    for p in files:
        if not p.exists():
            raise VpdError(f"merge input not found: {p}")
        if p.is_dir():
            raise VpdError(f"merge input is a directory, not a JSONL file: {p}")
        if p.resolve() == out.resolve():
            raise VpdError(f"merge output {out} is also an input")
    if not files and not allow_empty:
        only = f" (all {len(skipped)} inputs are side files, e.g. {skipped[0]})" if skipped else ""
        raise VpdError(f"nothing to merge{only}; --allow-empty writes an empty {out}")
    configs: dict[Path, dict[str, Any]] = {}
    for p in files:
        try:
            cfg = read_meta(p)
        except (ValueError, AttributeError) as e:  # a hand-edited or cut meta file
            raise VpdError(f"unreadable meta file {meta_path(p)}: {e}") from None
        if cfg is not None:
            configs[p] = {k: v for k, v in cfg.items() if k != "shard"}
    first = next(iter(configs.items()), None)
    for p, cfg in configs.items():
        if first is not None and cfg != first[1]:
            raise ConfigMismatch(
                f"cannot merge {first[0]} and {p}: different configs ({config_diff(first[1], cfg)})"
            )
    model, source = _merge_model(files, configs)
    merged_cfg = first[1] if first is not None else {"merged": True}
    existed = out.exists()
    summary = MergeSummary(files, skipped, model.__name__, source)
    so = StageOutput(out, merged_cfg, force=force)
    try:
        for p in files:
            _merge_file(p, model, so, summary)
    finally:
        so.close()
    summary.rejected = so.rejects.count
    summary.rejects = so.rejects.path if so.rejects.count else None
    if summary.written + summary.duplicates == 0:
        if not allow_empty:
            if not existed and not out.exists():
                meta_path(out).unlink(missing_ok=True)  # leave no meta of an output never made
            if summary.rejected:
                why = f"all {summary.rejected} lines rejected (reasons in {summary.rejects})"
            elif summary.unfinished:
                why = "only unfinished last lines (shards still writing?)"
            else:
                why = "they are empty"
            raise VpdError(
                f"no record to merge in {len(files)} input(s): {why}; "
                f"--allow-empty writes an empty {out}"
            )
        out.touch()  # the next stage finds a file with no records, not a missing one
    return summary


class MergeConfig(BaseModel):
    """Join the outputs of `--shard i/n` runs into one file, without duplicates.

    Each line is checked against the record type of the stage that wrote the shards
    (named in their .meta.json); bad lines go to OUT.rejects.jsonl with a reason.
    Run it again after more shards finish: only new ids are appended."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Merged output JSONL.")
    inputs: list[Path] = Field(
        description="Shard outputs to join (side files such as *.rejects.jsonl are skipped)."
    )
    force: bool = Field(False, description="Start --out over if it holds another config.")
    allow_empty: bool = Field(
        False, description="Write an empty --out when the inputs hold no record."
    )


def run_merge(cfg: MergeConfig) -> MergeSummary:
    """`vpd merge`: :func:`merge` with the command's options."""
    return merge(cfg.out, cfg.inputs, force=cfg.force, allow_empty=cfg.allow_empty)


def merge_line(cfg: MergeConfig, s: MergeSummary) -> str:
    return s.line(cfg.out)
