"""Sampling throughput against the fake OpenAI server: concurrency 1 vs 16 (ratio).

The server answers every request after a fixed latency (a stand-in for a GPU server's
time per request), so the ratio shows how well `vpd sample` keeps requests in flight.

    .venv/bin/python bench/bench_sample.py [--questions 64] [--k 5] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fake_openai_server import FakeOpenAIServer  # noqa: E402
from vpd.llm import LLMConfig  # noqa: E402
from vpd.sample import SampleConfig, run_sample  # noqa: E402


def _run(tmp: Path, url: str, concurrency: int, n_questions: int, k: int) -> dict:
    q = tmp / "q.jsonl"
    with open(q, "w") as f:
        for i in range(n_questions):
            rec = {"id": f"q{i}", "image": "x.png", "question": f"How many red shapes? #{i}"}
            f.write(json.dumps(rec) + "\n")
    out = tmp / f"s{concurrency}.jsonl"
    cfg = SampleConfig(
        questions=q,
        out=out,
        k=k,
        progress=False,
        llm=LLMConfig(backend="openai", base_urls=[url], concurrency=concurrency),
    )
    return run_sample(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per request")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, FakeOpenAIServer(latency_s=a.latency) as srv:
        base = _run(Path(d), srv.base_url, 1, a.questions, a.k)
        fast = _run(Path(d), srv.base_url, 16, a.questions, a.k)
    print(f"questions={a.questions} k={a.k} latency={a.latency}s (n={a.k} per request)")
    print(f"concurrency  1: {base['samples_per_s']:8.1f} samples/s  ({base['wall_s']:.2f} s)")
    print(f"concurrency 16: {fast['samples_per_s']:8.1f} samples/s  ({fast['wall_s']:.2f} s)")
    print(f"speed-up: {fast['samples_per_s'] / base['samples_per_s']:.1f}x")


if __name__ == "__main__":
    main()
