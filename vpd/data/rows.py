"""Input rows for the importers: one row per question, with its place in the file for rejects.

Shared by the generic importer (``vpd.data.importer``) and the official benchmark formats
(``vpd.data.official``): JSONL and JSON-array readers that never stop on a bad line, and
what a reject record needs (line number, raw text).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpd.errors import VpdError

RAW_MAX = 2000  # characters of a row kept in a reject record (RejectWriter cuts there too)


class Row:
    """One input row: its data, 1-based line/row number, and raw text for rejects.

    ``raw`` may be left out: it is then rendered from ``data`` only when asked (a reject),
    so a million-row JSON file costs no re-serialization.
    """

    __slots__ = ("data", "line", "_raw", "error", "hf_split")

    def __init__(
        self,
        line: int,
        data: dict[str, Any] | None,
        raw: str | None = None,
        error: str | None = None,
        hf_split: str | None = None,
    ) -> None:
        self.line, self.data, self._raw, self.error, self.hf_split = (
            line,
            data,
            raw,
            error,
            hf_split,
        )

    @property
    def raw(self) -> str:
        if self._raw is None:
            self._raw = raw_of(self.data)[:RAW_MAX]
        return self._raw


def raw_of(value: Any) -> str:
    """Row text for a reject record, with images/bytes summarized."""

    def small(v: Any) -> Any:
        if isinstance(v, bytes | bytearray):
            return f"<{len(v)} bytes>"
        if hasattr(v, "size") and hasattr(v, "mode"):
            return f"<image {v.size[0]}x{v.size[1]}>"
        if isinstance(v, dict):
            return {k: small(x) for k, x in v.items()}
        if isinstance(v, list):
            return [small(x) for x in v]
        return v

    return json.dumps(small(value), ensure_ascii=False, default=str)


def jsonl_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON-lines file; a malformed or non-object line becomes an error row."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            raw = line.rstrip("\n")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield Row(i, None, raw, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield Row(i, None, raw, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield Row(i, obj, raw)


def load_json(path: Path, **kwargs: Any) -> Any:
    """A whole JSON file; malformed JSON is a one-line error naming the file and line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return json.load(f, **kwargs)
    except json.JSONDecodeError as e:
        raise VpdError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}") from None


def list_rows(items: list[Any]) -> Iterator[Row]:
    """Rows of a JSON array (row number = position, 1-based); non-objects are error rows."""
    for i, obj in enumerate(items, 1):
        if not isinstance(obj, dict):
            raw = json.dumps(obj, ensure_ascii=False, default=str)
            yield Row(i, None, raw, f"expected a JSON object, got {type(obj).__name__}")
        else:
            yield Row(i, obj)


def json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON array file; a file that is really JSON lines is read as such."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        yield from jsonl_rows(path)  # many ".json" files are really JSONL
        return
    items = load_json(path)
    yield from list_rows(items)


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
