"""`vpd merge` end to end: sharded `vpd sample` runs -> merge -> `vpd execute` on the result."""

from __future__ import annotations

from pathlib import Path

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import invoke_vpd, read_jsonl, write_jsonl
from vpd.store import read_meta


def test_shards_merge_into_what_one_run_writes_and_the_next_stage_reads_it(
    synth_dir: Path, tmp_path: Path
) -> None:
    qs = read_jsonl(synth_dir / "train.jsonl")[:6]
    q = write_jsonl(tmp_path / "q.jsonl", [{**r, "image": str(synth_dir / r["image"])} for r in qs])
    shards = [tmp_path / "shards" / f"samples.{i}.jsonl" for i in range(2)]
    merged, whole = tmp_path / "samples.jsonl", tmp_path / "whole.jsonl"
    with FakeOpenAIServer() as srv:
        opts = ["--backend", "openai", "--base-url", srv.base_url, "--k", "2", "--shots", "0"]
        for i, shard in enumerate(shards):
            invoke_vpd(
                "sample", str(q), "--out", str(shard), *opts, "--shard", f"{i}/2", "--no-progress"
            )
        invoke_vpd("sample", str(q), "--out", str(whole), *opts, "--no-progress")  # one machine
    parts = [{r["id"] for r in read_jsonl(s)} for s in shards]
    assert parts[0] and parts[1] and not parts[0] & parts[1]  # both shards got work

    out = invoke_vpd("merge", "--out", str(merged), *map(str, shards)).output
    assert f"merged 2 files into {merged}: 12 new records, 0 duplicates skipped" in out
    by_id = {r["id"]: r for r in read_jsonl(merged)}
    assert len(by_id) == 12 and set(by_id) == parts[0] | parts[1]
    # The records one unsharded run writes (seeds depend on k, not on the shard), but for
    # the time each request took.
    timeless = {r["id"]: {**r, "latency_s": 0} for r in read_jsonl(whole)}
    assert {i: {**r, "latency_s": 0} for i, r in by_id.items()} == timeless
    assert read_meta(merged) == read_meta(whole)  # the config, without the shard
    # Merging again (e.g. after a shard was re-run) adds nothing.
    out = invoke_vpd("merge", "--out", str(merged), *map(str, shards)).output
    assert "0 new records, 12 duplicates skipped" in out

    # The next stage runs on the merged file as on any samples file.
    ex = tmp_path / "executions.jsonl"
    invoke_vpd("execute", str(merged), "--questions", str(q), "--out", str(ex), "--workers", "1",
         "--no-progress")  # fmt: skip
    execs = read_jsonl(ex)
    assert sorted(e["id"] for e in execs) == sorted(by_id)
    assert {e["status"] for e in execs} == {"ok"}
