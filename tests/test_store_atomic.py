"""store's atomic outputs: a failed write leaves the old file or folder, a clean one the new."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vpd.store import (
    atomic_dir,
    atomic_file,
    atomic_write,
    atomic_write_json,
    config_diff,
    set_aside,
)

PKG = Path(__file__).resolve().parent.parent / "vpd"


def test_atomic_write_replaces_whole_and_leaves_no_tmp(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    atomic_write(p, "old")
    atomic_write_json(p, {"b": 1, "a": "é"}, indent=2, sort_keys=True)
    assert p.read_text(encoding="utf-8") == json.dumps({"a": "é", "b": 1}, indent=2, sort_keys=True)
    atomic_write(p, b"\x00bytes")
    assert p.read_bytes() == b"\x00bytes"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_atomic_file_keeps_the_old_file_when_the_writer_fails(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    p.write_text("complete\n")
    with pytest.raises(RuntimeError), atomic_file(p) as tmp:
        assert tmp == tmp_path / "data.jsonl.tmp"  # same folder: the rename stays atomic
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert p.read_text() == "complete\n"
    assert not (tmp_path / "data.jsonl.tmp").exists()


def test_atomic_dir_swaps_a_folder_in_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / "new").write_text("x")
    assert [x.name for x in out.iterdir()] == ["new"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    (out / "old").mkdir(parents=True)
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "new").write_text("x")
        raise RuntimeError
    assert [x.name for x in out.iterdir()] == ["old"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
    # A named staging folder: a killed attempt's is cleared; a failed one is kept on request.
    (staging / "junk").mkdir(parents=True)
    with pytest.raises(RuntimeError), atomic_dir(out, staging, keep_failed=True) as tmp:
        assert tmp == staging and not any(staging.iterdir())
        (tmp / "rejects.jsonl").write_text("why\n")
        raise RuntimeError
    assert (staging / "rejects.jsonl").read_text() == "why\n"
    assert [x.name for x in out.iterdir()] == ["old"]


def test_set_aside_and_config_diff(tmp_path: Path) -> None:
    p = tmp_path / "o.jsonl"
    p.write_text("x")
    bak = set_aside(p, "20240101-000000")
    assert bak.name == "o.jsonl.20240101-000000.bak" and not p.exists()
    assert config_diff({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == "b: 2 -> 3, c: None -> 4"
    many = config_diff({}, {f"k{i}": i for i in range(7)})
    assert many.endswith(" ...") and many.count("->") == 5


def test_only_the_store_replaces_files() -> None:
    # One helper for atomic outputs (issue 25): no hand-written tmp + rename elsewhere.
    found = subprocess.run(
        ["grep", "-rln", "--include=*.py", "os.replace", str(PKG)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert [Path(f).relative_to(PKG).as_posix() for f in found] == ["store.py"]
