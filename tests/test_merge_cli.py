"""`vpd merge` end to end: sharded `vpd sample` runs -> merge -> `vpd execute` on the result;
bad lines, side files, folders and empty inputs."""

from __future__ import annotations

import glob
import shutil
import sys
from pathlib import Path

import pytest

from tests.fake_openai_server import FakeOpenAIServer
from tests.helpers import invoke_vpd, read_jsonl, write_jsonl
from vpd.cli import main
from vpd.store import meta_path, read_meta


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


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def sample_shards(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two `vpd sample --shard i/2` outputs (12 samples) with their side files: a meta
    file each and, since the questions hold a broken line, a rejects file each."""
    root = tmp_path_factory.mktemp("sample_shards")
    qs = read_jsonl(synth_dir / "train.jsonl")[:6]
    q = write_jsonl(root / "q.jsonl", [{**r, "image": str(synth_dir / r["image"])} for r in qs])
    with open(q, "a", encoding="utf-8") as f:
        f.write('{"id": "broken", "question": \n')
    with FakeOpenAIServer() as srv:
        for i in range(2):
            invoke_vpd("sample", str(q), "--out", str(root / "shards" / f"samples.{i}.jsonl"),
                       "--backend", "openai", "--base-url", srv.base_url, "--k", "2",
                       "--shots", "0", "--shard", f"{i}/2", "--no-progress")  # fmt: skip
    return root / "shards"


@pytest.fixture
def shards(sample_shards: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`sample_shards` that a test may damage."""
    return Path(shutil.copytree(sample_shards, tmp_path / "shards"))


def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """``vpd ARGS...`` through the console entry: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vpd", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code: int | str | None = 0  # a command that succeeds returns without SystemExit
    try:
        main()
    except SystemExit as e:
        code = e.code
    return (0 if code is None else int(code)), capsys.readouterr().err


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_bad_lines_are_rejected_and_reported_and_every_good_record_is_merged(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    s0, s1 = shards / "samples.0.jsonl", shards / "samples.1.jsonl"
    good = _lines(s0) + _lines(s1)
    assert len(good) == 12
    # Damage both shards: a broken JSON line in the middle of one (what follows it must
    # still be merged), a record with wrong fields and one with a field missing in the other.
    head = _lines(s0)
    s0.write_text("".join([*head[:2], '{"id": "q#0", "qid": "q", "k": 0, "prog\n', *head[2:]]))
    with open(s1, "a", encoding="utf-8") as f:
        f.write('{"id": "w#0", "qid": "w", "k": "first"}\n{"id": "m#1", "k": 1}\n')

    merged = tmp_path / "samples.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(s0), str(s1))
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1, err  # one summary line
    assert (
        f"merged 2 files into {merged}: 12 new records, 0 duplicates skipped, 3 rejected "
        f"(reasons in {merged}.rejects.jsonl)" in err
    )
    assert "checked as Sample records (by the inputs' meta)" in err
    assert sorted(_lines(merged)) == sorted(good)  # every good line, byte for byte, once
    rejects = read_jsonl(Path(f"{merged}.rejects.jsonl"))
    n1 = len(good) - len(head)  # the appended lines follow shard 1's records
    assert [(r["line"], r["id"]) for r in rejects] == [(3, None), (n1 + 1, "w#0"), (n1 + 2, "m#1")]
    assert rejects[0]["reason"].startswith(f"{s0}: malformed JSON")
    assert rejects[1]["reason"].startswith(f"{s1}: invalid Sample record: k:")
    assert "qid: Field required" in rejects[2]["reason"]
    assert rejects[1]["raw"] == '{"id": "w#0", "qid": "w", "k": "first"}'

    # Merging again finds every good record merged; the bad lines are reported again.
    before = merged.read_bytes()
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(s0), str(s1))
    assert code == 0 and "0 new records, 12 duplicates skipped, 3 rejected" in err, err
    assert merged.read_bytes() == before
    assert len(read_jsonl(Path(f"{merged}.rejects.jsonl"))) == 3


def test_a_shard_still_writing_is_merged_up_to_its_cut_line_and_finished_next_time(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    s0, s1 = shards / "samples.0.jsonl", shards / "samples.1.jsonl"
    *done, last = _lines(s1)
    s1.write_text("".join(done) + last[:25], encoding="utf-8")  # the writer is mid-line
    merged = tmp_path / "samples.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(s0), str(s1))
    assert code == 0, err
    n = len(_lines(s0)) + len(done)
    assert f"{n} new records, 0 duplicates skipped, 0 rejected, 1 unfinished last lines" in err
    assert not Path(f"{merged}.rejects.jsonl").exists()  # a cut line is not a bad line
    first = merged.read_bytes()

    s1.write_text("".join(done) + last, encoding="utf-8")  # the shard finished
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(s0), str(s1))
    assert code == 0 and f"1 new records, {n} duplicates skipped, 0 rejected" in err, err
    assert merged.read_bytes() == first + last.encode()  # appended, nothing rewritten


def test_side_files_matched_by_the_glob_are_skipped(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # What `shards/samples.*` expands to: each shard, its meta and its rejects (the broken
    # question line); `samples.*.jsonl`, the scripts' glob, catches the rejects files too.
    matched = sorted(glob.glob(str(shards / "samples.*")))
    side = [p for p in matched if p.endswith((".meta.json", ".rejects.jsonl"))]
    assert len(side) == 4 and len(matched) == 6
    assert read_jsonl(Path(side[-1]))[0]["reason"]  # a real reject record
    merged = tmp_path / "samples.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), *matched)
    assert code == 0, err
    assert (
        "merged 2 files into" in err and "12 new records, 0 duplicates skipped, 0 rejected" in err
    )
    assert "; 4 side files skipped (samples.0.jsonl.meta.json, " in err
    recs = read_jsonl(merged)
    assert len(recs) == 12 and all("qid" in r and "reason" in r for r in recs)
    assert not any("raw" in r or "line" in r for r in recs)  # no reject record among samples
    assert not Path(f"{merged}.rejects.jsonl").exists()

    # Only side files: nothing to merge is an error, not an empty success.
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(tmp_path / "m.jsonl"), *side)
    assert code == 2 and "nothing to merge (all 4 inputs are side files" in err, err


def test_without_meta_the_fields_tell_the_record_type(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    s0, s1 = shards / "samples.0.jsonl", shards / "samples.1.jsonl"
    for s in (s0, s1):
        meta_path(s).unlink()
    with open(s1, "a", encoding="utf-8") as f:
        f.write('{"id": "w#0", "qid": "w", "k": -1}\n')
    merged = tmp_path / "samples.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(s0), str(s1))
    assert code == 0 and "12 new records, 0 duplicates skipped, 1 rejected" in err, err
    assert "checked as Sample records (by their fields)" in err
    # A glob that also caught another stage's output is refused before anything is written.
    ex = write_jsonl(shards / "executions.0.jsonl", [
        {"id": "a#0", "qid": "a", "k": 0, "status": "ok", "answer": "2"}])  # fmt: skip
    other = tmp_path / "other.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(other), str(ex), str(s0))
    assert code == 2 and "(Execution records) with" in err and "(Sample records)" in err, err
    assert not other.exists()


def test_a_folder_input_or_a_broken_meta_is_a_one_line_error(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    merged = tmp_path / "samples.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), str(shards))
    assert code == 2
    assert err.strip() == f"error: merge input is a directory, not a JSONL file: {shards}"
    assert not merged.exists()

    meta = meta_path(shards / "samples.1.jsonl")
    meta.write_text(meta.read_text()[:20])  # cut short
    args = [str(shards / f"samples.{i}.jsonl") for i in range(2)]
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: unreadable meta file {meta}: ")
    assert not merged.exists()


def test_empty_inputs_are_an_error_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    empty = [tmp_path / "e.0.jsonl", tmp_path / "e.1.jsonl"]
    empty[0].write_text("")
    empty[1].write_text("\n\n")  # blank lines hold no record either
    merged = tmp_path / "merged.jsonl"
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), *map(str, empty))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "no record to merge in 2 input(s): they are empty; --allow-empty" in err
    assert not merged.exists() and not meta_path(merged).exists()

    # All lines rejected is as empty a result, and says where the reasons are.
    empty[1].write_text('{"id": 5}\n')
    code, err = _cli(monkeypatch, capsys, "merge", "--out", str(merged), *map(str, empty))
    assert code == 2 and "all 1 lines rejected (reasons in" in err, err
    assert not merged.exists() and len(read_jsonl(Path(f"{merged}.rejects.jsonl"))) == 1

    empty[1].write_text("")
    args = ("merge", "--out", str(merged), "--allow-empty", *map(str, empty))
    code, err = _cli(monkeypatch, capsys, *args)
    assert code == 0 and "merged 2 files into" in err and "0 new records" in err, err
    assert merged.exists() and merged.read_bytes() == b""  # the next stage finds a file
