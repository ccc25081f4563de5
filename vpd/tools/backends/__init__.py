"""Tool backends by name. ``synthetic``: classical CV on the pixels of shape scenes;
``hf``: detector / CLIP / VLM / depth models from Hugging Face checkpoints (real photos).

A backend module registers a factory here; it is imported only when asked for, so a
heavy backend (models, GPU libraries) costs nothing to a run that does not use it.
"""

from __future__ import annotations

import importlib
from typing import Any

from vpd.errors import VpdError
from vpd.llm.base import LLM
from vpd.tools.backends.base import Backend, ImageData, ToolError

# name -> "module:class"; the class is built as cls(llm=llm, **options)
BACKENDS: dict[str, str] = {
    "synthetic": "vpd.tools.backends.synthetic:SyntheticBackend",
    "hf": "vpd.tools.backends.hf:HFBackend",
}


def get_backend(name: str, llm: LLM | None = None, **options: Any) -> Backend:
    """Build the backend registered as ``name`` (an LLM, if given, serves ``llm_query``)."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise VpdError(f"unknown tool backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    mod, _, cls = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        raise VpdError(f"tool backend {name!r} is not available: {e}") from None
    try:
        return factory(llm=llm, **options)
    except (TypeError, ValueError, ToolError) as e:
        raise VpdError(f"bad options for tool backend {name!r}: {e}") from None


__all__ = ["BACKENDS", "Backend", "ImageData", "ToolError", "get_backend"]
