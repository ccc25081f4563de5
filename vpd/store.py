"""Resumable JSONL storage: the resume contract every stage follows.

- outputs are append-only; a record is written whole, flushed, fsync'd at batch ends;
- on start the output's done ids are read (streaming; ids kept as 64-bit hashes so a
  million-line file costs a few MB), and a torn last line from a kill is cut off;
- ``--shard i/n`` assigns work by a stable hash of a key (the question id);
- ``<out>.meta.json`` fingerprints the run config; resuming under another config is
  an error unless ``force`` (then the old output is moved aside, never mixed);
- bad input lines go to ``<out>.rejects.jsonl`` with a reason; the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from vpd.errors import ConfigMismatch, VpdError
from vpd.records import Reject

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


def read_records(
    path: Path,
    model: type[M],
    rejects: RejectWriter | None = None,
    check: Callable[[M], str | None] | None = None,
) -> Iterator[M]:
    """Stream validated records; bad lines go to ``rejects`` with a reason.

    ``check`` may return an extra reason to reject a well-formed record (e.g. a
    missing image file). Duplicate ids after the first are rejected too.
    """
    path = Path(path)
    if not path.exists():
        raise VpdError(f"input file not found: {path}")
    if path.is_dir():
        raise VpdError(f"expected a JSONL file, got a directory: {path}")
    seen = DoneIds()

    def reject(lineno: int, reason: str, raw: str, rid: str | None = None) -> None:
        if rejects is not None:
            rejects.write(lineno, reason, raw, rid)

    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                reject(lineno, f"malformed JSON: {e.msg} at column {e.colno}", raw)
                continue
            if not isinstance(obj, dict):
                reject(lineno, f"expected a JSON object, got {type(obj).__name__}", raw)
                continue
            rid = obj.get("id") if isinstance(obj.get("id"), str) else None
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


# --------------------------------------------------------------------------- writing


# --------------------------------------------------------------------------- input indexing


class LabelledRejects:
    """Prefix reject reasons with the input they came from (three inputs, one rejects file)."""

    def __init__(self, rejects: Any, label: str) -> None:
        self.rejects, self.label = rejects, label

    def write(self, line: int, reason: str, raw: str, rid: str | None = None) -> None:
        self.rejects.write(line, f"{self.label}: {reason}", raw, rid)


def scan_jsonl(
    path: Path, model: type[Any], rejects: Any, label: str
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
    offset = 0
    with open(path, "rb") as f:
        for lineno, bline in enumerate(f, 1):
            start, offset = offset, offset + len(bline)
            raw = bline.decode("utf-8", errors="replace").rstrip("\n")
            if not raw.strip():
                continue
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
                diff = _diff(old or {}, config)
                raise ConfigMismatch(
                    f"{out} was written with a different config ({diff}); use the same "
                    "options to resume, another --out, or --force to start over "
                    "(the old output is kept as a .bak file)"
                )
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out.rename(Path(f"{out}.{stamp}.bak"))
            mp.rename(Path(f"{mp}.{stamp}.bak"))
    elif mp.exists() and not out.exists():
        mp.unlink()
    if not mp.exists():
        mp.parent.mkdir(parents=True, exist_ok=True)
        tmp = mp.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"config": config, "created": time.time()}, indent=2, sort_keys=True),
            encoding="utf-8",
        )
        os.replace(tmp, mp)


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


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(parts[:5]) + (" ..." if len(parts) > 5 else "")


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

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- merge


def merge(out: Path, inputs: Iterable[Path], force: bool = False) -> tuple[int, int]:
    """Join shard outputs into ``out`` without duplicate ids; returns (written, duplicates).

    Shard outputs must share one config (apart from the shard itself); the merged
    meta is that config. Re-running after a new shard finished appends only its new ids.
    """
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise VpdError(f"merge input not found: {p}")
        if p.resolve() == Path(out).resolve():
            raise VpdError(f"merge output {out} is also an input")
    configs = []
    for p in inputs:
        cfg = read_meta(p)
        if cfg is not None:
            cfg = {k: v for k, v in cfg.items() if k != "shard"}
            configs.append((p, cfg))
    for p, cfg in configs[1:]:
        if cfg != configs[0][1]:
            raise ConfigMismatch(
                f"cannot merge {configs[0][0]} and {p}: different configs "
                f"({_diff(configs[0][1], cfg)})"
            )
    merged_cfg = configs[0][1] if configs else {"merged": True}
    so = StageOutput(Path(out), merged_cfg, force=force)
    dup = 0
    try:
        for p in inputs:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break
                    rid = _line_id(line)
                    if rid is None:
                        continue
                    if so.done(rid):
                        dup += 1
                        continue
                    so.write_line(rid, line)
    finally:
        so.close()
    return so.written, dup
