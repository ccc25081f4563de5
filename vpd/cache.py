"""Artefacts built once per machine (dequantized LMs, the tiny VLM): where they live, and how
they are written so that concurrent builders (two DeepSpeed ranks, two runs) never see a
half-written folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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
        return json.loads((folder / STAMP).read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def atomic_fill(out: Path, key: str, fill: Callable[[Path], object]) -> None:
    """Run ``fill(tmp)`` and rename ``tmp`` to ``out``; a concurrent winner is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        (tmp / STAMP).write_text(json.dumps({"key": key}))
        if out.exists():
            if is_complete(out, key):  # another process won the race
                return
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out, key):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
