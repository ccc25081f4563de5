"""Artefacts built once per machine (dequantized LMs, the tiny VLM and its vision tower):
where they live, and how they are written so that concurrent builders (two DeepSpeed
ranks, two runs) never see a half-written folder, and build it once: the second waits for
the first (an exclusive file lock beside the folder) and reuses its result."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from vpd.store import atomic_dir

STAMP = "vpd_tiny.json"  # {"key": ...}: written last, so a folder with it is complete


def cache_root() -> Path:
    """Where built artefacts live; ``$VPD_CACHE_DIR`` wins (CI, read-only homes)."""
    env = os.environ.get("VPD_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vpd"


def is_complete(folder: Path, key: str) -> bool:
    """True when ``folder`` holds a finished build of ``key``."""
    try:
        return json.loads((Path(folder) / STAMP).read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``out`` (released on exit, or by
    the OS when the holder dies: a killed build never leaves the folder locked)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_fill(out: Path, key: str, fill: Callable[[Path], object]) -> bool:
    """Make ``out`` a finished build of ``key`` by ``fill(tmp)`` and a rename, unless it
    already is one (perhaps built by another process while this one waited for the lock).
    Returns whether this call built it."""
    out = Path(out)
    if is_complete(out, key):
        return False
    with build_lock(out):
        if is_complete(out, key):
            return False
        # Replaces a half-written folder, or another key's, whole.
        with atomic_dir(out) as tmp:
            fill(tmp)
            (tmp / STAMP).write_text(json.dumps({"key": key}))
    return True
