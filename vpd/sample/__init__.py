"""`vpd sample`: k candidate programs per question from an LLM.

- :mod:`vpd.sample.prompt`: versioned prompt templates, the API spec generated from the
  tools, few-shot retrieval;
- :mod:`vpd.sample.extract`: the program out of a completion (fences, repairs, checks);
- :mod:`vpd.sample.runner`: the resumable stage (``SampleConfig``, ``run_sample``).

The LLM clients (:mod:`vpd.llm`) know nothing of programs: they turn chat messages into
completions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpd.sample.runner import SampleConfig, run_sample, summary_line

__all__ = ["SampleConfig", "run_sample", "summary_line"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m vpd.sample.prompt` (the API spec writer) runs without the stage.
    if name in __all__:
        from vpd.sample import runner

        return getattr(runner, name)
    raise AttributeError(name)
