"""LLM clients behind one interface (``vpd.llm.base.LLM``): openai, vllm, local.

``make_llm(LLMConfig(...))`` builds one; backends import their heavy libraries lazily.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vpd.errors import VpdError
from vpd.llm.base import LLM, Completion, GenParams, Messages
from vpd.llm.config import LLMConfig

__all__ = [
    "LLM",
    "Completion",
    "GenParams",
    "LLMConfig",
    "Messages",
    "make_llm",
    "make_llm_from_spec",
]


def make_llm(spec: LLMConfig) -> LLM:
    """An LLM for ``spec.backend``; raises ``VpdError`` when the backend cannot run here."""
    if spec.backend == "openai":
        from vpd.llm.openai_backend import OpenAILLM

        return OpenAILLM(spec)
    if spec.backend == "vllm":
        from vpd.llm.vllm_backend import VllmLLM

        return VllmLLM(spec)
    from vpd.llm.local import LocalLLM

    return LocalLLM(spec)


def make_llm_from_spec(spec: dict[str, Any]) -> LLM:
    """An LLM from a ``vpd.llm.LLMConfig``-shaped dict (the ``llm:`` section of a config)."""
    try:
        return make_llm(LLMConfig.model_validate(spec))
    except ValidationError as e:
        raise VpdError(f"LLM options: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
