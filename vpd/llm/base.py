"""The one small interface every LLM backend implements (openai, vllm, local)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vpd.errors import VpdError

Messages = list[dict[str, Any]]  # OpenAI/HF chat format: [{"role": ..., "content": ...}]


class LLMUnavailable(VpdError):
    """The LLM could not answer after the bounded retries (dead server, bad URL, ...)."""


@dataclass
class GenParams:
    n: int = 1
    temperature: float = 0.0
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # base seed; sample i of a request uses seed + i
    seeds: list[int] | None = None  # explicit per-sample seeds (len n); overrides ``seed``

    def sample_seeds(self) -> list[int | None]:
        """The seed of each of the ``n`` samples (the same for every conversation)."""
        if self.seeds is not None:
            if len(self.seeds) != self.n:
                raise ValueError(f"GenParams.seeds has {len(self.seeds)} seeds for n={self.n}")
            return list(self.seeds)
        if self.seed is None:
            return [None] * self.n
        return [self.seed + i for i in range(self.n)]


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    seed: int | None = None
    finish_reason: str | None = None
    # Index of this sample among the n asked for its conversation (stream() order may differ).
    index: int = 0
    # Non-retryable per-request failure (e.g. prompt too long): text is "" and this says why.
    error: str | None = None


class LLM(Protocol):
    """A chat LLM. ``generate`` returns, per conversation, ``params.n`` completions."""

    name: str

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def stream(llm: LLM, batch: list[Messages], params: GenParams) -> Iterator[tuple[int, Completion]]:
    """Yield ``(conversation index, completion)`` as soon as each completion is ready.

    Backends that can finish requests out of order (openai) implement ``stream`` themselves,
    so callers can write results while others are in flight; others fall back to ``generate``.
    """
    own = getattr(llm, "stream", None)
    if own is not None:
        yield from own(batch, params)
        return
    for i, comps in enumerate(llm.generate(batch, params)):
        for c in comps:
            yield i, c
