"""The files the package ships beside its code: prompt templates and recipes.

They live in ``vpd/prompts/`` and ``vpd/recipes/`` (package data, so a wheel or a plain
``pip install .`` carries them) and are found through :mod:`importlib.resources`, never
relative to a checkout. The checkout's top-level ``prompts/`` and ``recipes/`` are links to
these folders, so ``vpd run recipes/demo-cpu.yaml`` keeps working from a clone.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from vpd.errors import VpdError


def shipped(name: str) -> Path:
    """The shipped folder ``vpd/<name>/`` as a real directory.

    A pip-installed or editable package is a folder on disk, so ``files()`` is a Path;
    only a zip import is not, and the prompt/recipe code globs and opens paths.
    """
    root = files("vpd") / name
    if not isinstance(root, Path):
        raise VpdError(f"vpd is imported from an archive ({root}); install it with pip")
    return root


def prompts_dir() -> Path:
    """``vpd/prompts/``: ``<family>/<version>/`` prompt templates and few-shot pools."""
    return shipped("prompts")


def recipes_dir() -> Path:
    """``vpd/recipes/``: pipeline recipes, DeepSpeed configs, ``scale/`` scripts."""
    return shipped("recipes")


def shipped_recipes() -> list[str]:
    """Names of the shipped YAML recipes, for error messages."""
    return sorted(p.name for p in recipes_dir().glob("*.yaml"))


def find_recipe(path: str | Path) -> Path:
    """``path`` if it exists; else a bare name (``demo-cpu.yaml`` or ``demo-cpu``) of a
    shipped recipe, so an installed vpd runs its recipes without a checkout. A path with
    a folder in it is never redirected: a typo there stays a clear "not found"."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    for name in (path.name, f"{path.name}.yaml"):
        candidate = recipes_dir() / name
        if candidate.is_file():
            return candidate
    return path
