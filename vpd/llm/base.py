"""The one small interface every LLM backend implements (openai, vllm, local)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Messages = list[dict[str, Any]]  # OpenAI/HF chat format: [{"role": ..., "content": ...}]


@dataclass
class GenParams:
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # base seed; sample i of a request uses seed + i


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    seed: int | None = None
    finish_reason: str | None = None


class LLM(Protocol):
    """A chat LLM. ``generate`` returns, per conversation, ``params.n`` completions."""

    name: str

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...
