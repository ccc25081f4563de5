"""`vpd sample`: k candidate programs per question from an LLM.

- :mod:`vpd.sample.prompt`: versioned prompt templates, the API spec generated from the
  tools, few-shot retrieval;
- :mod:`vpd.sample.extract`: the program out of a completion (fences, repairs, checks);
- :mod:`vpd.sample.runner`: the resumable stage (``SampleConfig``, ``run_sample``).

The LLM clients (:mod:`vpd.llm`) know nothing of programs: they turn chat messages into
completions.
"""

from __future__ import annotations

from vpd.sample.runner import SampleConfig, print_summary, run_sample

__all__ = ["SampleConfig", "print_summary", "run_sample"]
