"""Is an image file usable? Checked before the expensive part of a stage, once per file.

A stage that reads images (import, execute, rationalize, export) asks here first, so a
missing or corrupt image is the input's fault, reported with its reason, instead of a
program's error or a trainer that crashes at that row hours later.
"""

from __future__ import annotations

from pathlib import Path


def resolve_image(name: str | Path, base: str | Path) -> Path:
    """An image named in a record: relative names are relative to ``base``, the folder of
    the file that names them (the record schema's rule); absolute ones stay."""
    p = Path(name)
    return p if p.is_absolute() else Path(base) / p


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image (``None`` when it is).

    The header is decoded and the file's structure verified (PIL's ``verify``: PNG chunk
    checksums, truncation), which takes well under a millisecond, not a full decode.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        return f"image not found: {p}" if not p.exists() else f"image is not a file: {p}"
    try:
        with Image.open(p) as im:
            im.verify()
    except UnidentifiedImageError:
        return f"not an image file (unknown format): {p}"
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises SyntaxError for bad chunks
        return f"corrupt image ({e}): {p}"
    return None


class ImageChecks:
    """:func:`image_problem` remembered per path: a stage asks about the same image for
    every program of its question."""

    def __init__(self) -> None:
        self._seen: dict[str, str | None] = {}

    def problem(self, path: str | Path) -> str | None:
        key = str(path)
        if key not in self._seen:
            self._seen[key] = image_problem(key)
        return self._seen[key]

    def first_problem(self, paths: list[str]) -> str | None:
        """The first of ``paths`` that is not a readable image, as its reason."""
        return next((why for why in map(self.problem, paths) if why), None)
