"""Offline vLLM backend: ``vllm.LLM`` batch generation in-process (GPU machines).

One ``LLM.chat`` call per batch: vLLM schedules the conversations and their ``n`` samples
itself (continuous batching, prefix caching), so this is the fastest way to sample on a GPU
without running a server.
"""

from __future__ import annotations

import time
from typing import Any

from vpd.errors import VpdError
from vpd.llm.base import Completion, GenParams, Messages
from vpd.llm.config import LLMConfig

NOT_INSTALLED = (
    "vllm is not installed; pip install vpd[vllm] on a GPU machine, "
    "or use --backend openai --base-url"
)


class VllmLLM:
    """``LLM`` over an in-process ``vllm.LLM`` engine."""

    def __init__(self, cfg: LLMConfig) -> None:
        try:
            import vllm
        except ImportError:
            raise VpdError(NOT_INSTALLED) from None
        if cfg.model is None:
            raise VpdError("the vllm backend needs --model (a Hugging Face model id or folder)")
        self._vllm = vllm
        self.cfg = cfg
        self.name = cfg.model
        kw: dict[str, Any] = {
            "model": cfg.model,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "trust_remote_code": cfg.trust_remote_code,
            "enable_prefix_caching": True,  # the system prompt + API spec is shared
        }
        if cfg.max_model_len is not None:
            kw["max_model_len"] = cfg.max_model_len
        if cfg.dtype != "auto":
            kw["dtype"] = cfg.dtype
        self.engine = vllm.LLM(**kw)

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]:
        # n samples in one request seeded by the first sample's seed (as the openai backend
        # does): vLLM shares the prompt's KV blocks across the n samples.
        seed = params.sample_seeds()[0]
        sp = self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            max_tokens=params.max_tokens,
            stop=params.stop or None,
            seed=seed,
        )
        t0 = time.perf_counter()
        results = self.engine.chat(batch, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        out: list[list[Completion]] = []
        for res in results:
            pt = len(res.prompt_token_ids or [])
            out.append(
                [
                    Completion(
                        text=o.text,
                        prompt_tokens=pt,
                        completion_tokens=len(o.token_ids),
                        latency_s=dt,
                        seed=seed,
                        finish_reason=o.finish_reason,
                        index=j,
                    )
                    for j, o in enumerate(res.outputs)
                ]
            )
        return out

    def close(self) -> None:
        self.engine = None
