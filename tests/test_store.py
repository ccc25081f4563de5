"""vpd.store: the resume contract under kills, torn lines, shards, config changes, merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpd.errors import ConfigMismatch, VpdError
from vpd.records import Question
from vpd.store import (
    DoneIds,
    JsonlWriter,
    RejectWriter,
    StageOutput,
    iter_ids,
    merge,
    meta_path,
    parse_shard,
    read_done_ids,
    read_meta,
    read_records,
    rejects_path,
    repair_torn_tail,
    stable_hash,
)

CFG = {"model": "m", "temperature": 0.7}


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def _q(i: int | str, **kw: object) -> dict:
    return {"id": f"q{i}", "image": "a.png", "question": "what?", "answers": ["x"], **kw}


# ----------------------------------------------------------------------------- kill + resume

_WRITER = textwrap.dedent(
    """
    import sys, time
    from vpd.store import StageOutput
    out, n = sys.argv[1], int(sys.argv[2])
    with StageOutput(out, {"model": "m", "temperature": 0.7}) as so:
        for i in range(n):
            rid = f"q{i}"
            if so.done(rid):
                continue
            so.write({"id": rid, "payload": "x" * 200, "i": i})
            time.sleep(0.002)
    """
)


def test_resume_after_kill9_writes_each_id_exactly_once(tmp_path: Path) -> None:
    out, n = tmp_path / "out.jsonl", 400
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)])
    deadline = time.time() + 60
    while time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= 50:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 50 <= partial < n, "the writer must be killed mid-way"
    # A kill can also leave half a line: simulate the worst case.
    with open(out, "a") as f:
        f.write('{"id": "q399", "payload": "xx')
    subprocess.run([sys.executable, str(script), str(out), str(n)], check=True, timeout=120)
    ids = _ids(out)  # every line parses: the torn tail was cut, not kept
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))
    assert len(ids) == len(set(ids))
    # A re-run after completion writes nothing.
    size = out.stat().st_size
    subprocess.run([sys.executable, str(script), str(out), str(n)], check=True, timeout=120)
    assert out.stat().st_size == size


def test_torn_tail_ignored_by_readers_and_repaired(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id":"a"}\n{"id":"b"}\n{"id":"c", "x": ')
    assert list(iter_ids(out)) == ["a", "b"]
    assert "c" not in read_done_ids(out)
    assert repair_torn_tail(out) == len('{"id":"c", "x": ')
    assert out.read_text() == '{"id":"a"}\n{"id":"b"}\n'
    assert repair_torn_tail(out) == 0
    only = tmp_path / "only.jsonl"
    only.write_text('{"id":"a"')  # no complete line at all
    repair_torn_tail(only)
    assert only.read_text() == ""
    big = tmp_path / "big.jsonl"  # the backward scan crosses its 64 KiB block boundary
    big.write_text('{"id":"z"}\n' + '{"id":"t","p":"' + "x" * 200_000)
    repair_torn_tail(big)
    assert big.read_text() == '{"id":"z"}\n'


def test_stage_output_resume_skips_done_and_appends(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with StageOutput(out, CFG) as so:
        for i in range(5):
            so.write(Question(**_q(i)))
    out.write_text(out.read_text() + '{"id":"q5","ima')  # torn
    with StageOutput(out, CFG) as so:
        assert so.already == 5 and so.torn_bytes > 0
        assert so.done("q4") and not so.done("q5")
        for i in range(8):
            if not so.done(f"q{i}"):
                so.write(Question(**_q(i)))
        assert so.written == 3 and so.done("q7")
    assert _ids(out) == [f"q{i}" for i in range(8)]


def test_iter_ids_fast_path_and_fallback(tmp_path: Path) -> None:
    p = tmp_path / "ids.jsonl"
    lines = [
        '{"id":"plain"}',
        '{"id": "spaced", "x": 1}',
        '{"x": 1, "id": "late"}',
        '{ "id" : "odd spacing" }',
        '{"id":"esc\\"aped\\u00e9"}',
        '{"id": 5}',  # not a string id: not an id
        "[1, 2]",
        "not json",
        "",
    ]
    p.write_text("\n".join(lines) + "\n")
    assert list(iter_ids(p)) == ["plain", "spaced", "late", "odd spacing", 'esc"apedé']


# ----------------------------------------------------------------------------- done ids


@settings(max_examples=60, deadline=None)
@given(
    stored=st.sets(st.text(min_size=1, max_size=12), max_size=60),
    added=st.sets(st.text(min_size=1, max_size=12), max_size=20),
    probes=st.lists(st.text(min_size=1, max_size=12), max_size=30),
)
def test_done_ids_behaves_like_a_set(stored: set[str], added: set[str], probes: list[str]) -> None:
    import numpy as np

    hashes = np.array([stable_hash(s) for s in stored], dtype=np.uint64)
    done = DoneIds(hashes)
    for a in added:
        done.add(a)
    truth = stored | added
    for key in [*probes, *stored, *added]:
        assert (key in done) == (key in truth)
    assert len(done) >= len(truth)  # may double-count an id that was both read and added


def test_read_done_ids_across_chunks(tmp_path: Path) -> None:
    p = tmp_path / "o.jsonl"
    p.write_text("".join(f'{{"id":"r{i}"}}\n' for i in range(1000)))
    done = read_done_ids(p, chunk=64)  # forces many chunk boundaries
    assert len(done) == 1000
    assert all(f"r{i}" in done for i in range(1000))
    assert "r1000" not in done
    assert len(read_done_ids(tmp_path / "missing.jsonl")) == 0


def test_stable_hash_is_stable_across_processes() -> None:
    code = "from vpd.store import stable_hash; print(stable_hash('q-17'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert int(got.stdout) == stable_hash("q-17")


# ----------------------------------------------------------------------------- shards


@settings(max_examples=30, deadline=None)
@given(ids=st.sets(st.text(min_size=1, max_size=20), max_size=200), n=st.integers(1, 5))
def test_shards_cover_every_id_exactly_once(ids: set[str], n: int) -> None:
    shards = [parse_shard(f"{i}/{n}") for i in range(n)]
    for key in ids:
        assert sum(s.owns(key) for s in shards) == 1


def test_shards_are_roughly_balanced() -> None:
    ids = [f"q{i}" for i in range(4000)]
    for n in (2, 3, 5):
        sizes = [sum(parse_shard(f"{i}/{n}").owns(k) for k in ids) for i in range(n)]
        assert min(sizes) > 0.8 * len(ids) / n


@pytest.mark.parametrize("bad", ["1", "a/b", "2/2", "-1/3", "0/0", "1/2/3"])
def test_parse_shard_rejects_bad_specs(bad: str) -> None:
    with pytest.raises(VpdError):
        parse_shard(bad)


def test_parse_shard_none() -> None:
    assert parse_shard(None) is None and parse_shard("") is None
    assert str(parse_shard("1/4")) == "1/4"


# ----------------------------------------------------------------------------- meta


def test_meta_mismatch_errors_and_force_moves_old_output_aside(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with StageOutput(out, CFG) as so:
        so.write({"id": "a"})
    assert read_meta(out) == CFG
    with pytest.raises(ConfigMismatch, match="temperature"):
        StageOutput(out, {**CFG, "temperature": 1.0})
    assert _ids(out) == ["a"]  # untouched by the refused run
    with StageOutput(out, {**CFG, "temperature": 1.0}, force=True) as so:
        assert so.already == 0
        so.write({"id": "b"})
    assert _ids(out) == ["b"]
    baks = sorted(p.name for p in tmp_path.glob("*.bak"))
    assert len(baks) == 2  # output and its meta
    old = next(p for p in tmp_path.glob("o.jsonl.*.bak") if ".meta." not in p.name)
    assert _ids(old) == ["a"]
    assert read_meta(out)["temperature"] == 1.0


def test_same_config_resumes_and_shard_is_part_of_config(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    StageOutput(out, CFG, shard=parse_shard("0/2")).close()
    out.write_text('{"id":"a"}\n')
    with pytest.raises(ConfigMismatch):
        StageOutput(out, CFG, shard=parse_shard("1/2"))
    with StageOutput(out, CFG, shard=parse_shard("0/2")) as so:
        assert so.done("a")


def test_stale_meta_without_output_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    meta_path(out).write_text(json.dumps({"config": {"other": 1}}))
    StageOutput(out, CFG).close()  # nothing to protect: no error
    assert read_meta(out) == CFG


def test_out_must_be_a_file(tmp_path: Path) -> None:
    with pytest.raises(VpdError, match="directory"):
        StageOutput(tmp_path, CFG)


# ----------------------------------------------------------------------------- rejects


def test_read_records_rejects_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "q.jsonl"
    (tmp_path / "a.png").write_bytes(b"png")
    lines = [
        json.dumps(_q(1)),
        "{not json",
        json.dumps({"id": "q2", "image": "a.png"}),  # no question
        json.dumps(_q(3, image="missing.png")),
        json.dumps(_q(1)),  # duplicate
        "[1]",
        "",
        json.dumps(_q(4, extra={"kept": True})),
    ]
    src.write_text("\n".join(lines) + "\n")

    def check(q: Question) -> str | None:
        img = tmp_path / q.image
        return None if img.exists() else f"missing image file: {img}"

    rw = RejectWriter(rejects_path(tmp_path / "out.jsonl"))
    with rw:
        got = list(read_records(src, Question, rw, check))
    assert [q.id for q in got] == ["q1", "q4"]
    assert got[1].model_dump()["extra"] == {"kept": True}  # extra keys survive
    rej = [json.loads(x) for x in rw.path.read_text().splitlines()]
    assert [r["line"] for r in rej] == [2, 3, 4, 5, 6]
    reasons = [r["reason"] for r in rej]
    assert reasons[0].startswith("malformed JSON")
    assert "question" in reasons[1] and rej[1]["id"] == "q2"
    assert reasons[2].startswith("missing image file")
    assert reasons[3] == "duplicate id 'q1'"
    assert "JSON object" in reasons[4]
    assert rej[0]["raw"] == "{not json"


def test_read_records_missing_input_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(VpdError, match="not found"):
        list(read_records(tmp_path / "nope.jsonl", Question))
    with pytest.raises(VpdError, match="directory"):
        list(read_records(tmp_path, Question))


def test_clean_run_removes_stale_rejects(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    rp = rejects_path(out)
    rp.write_text('{"line": 1, "reason": "old", "raw": ""}\n')
    StageOutput(out, CFG).close()
    assert not rp.exists()


# ----------------------------------------------------------------------------- merge


def _shard_outputs(tmp_path: Path, n: int, ids: list[str], cfg: dict) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"o.{i}.jsonl"
        with StageOutput(p, cfg, shard=parse_shard(f"{i}/{n}")) as so:
            for rid in ids:
                if so.owns(rid):
                    so.write({"id": rid, "shard": i})
        paths.append(p)
    return paths


def test_merge_joins_shards_without_duplicates(tmp_path: Path) -> None:
    ids = [f"q{i}" for i in range(100)]
    parts = _shard_outputs(tmp_path, 3, ids, CFG)
    out = tmp_path / "merged.jsonl"
    s = merge(out, parts)
    assert (s.written, s.duplicates, s.rejected) == (100, 0, 0)
    assert sorted(_ids(out)) == sorted(ids)
    assert read_meta(out) == CFG  # merged meta drops the shard
    # Re-merging (e.g. after one shard grew) appends only new ids.
    with open(parts[0], "a") as f:
        f.write('{"id": "new"}\n{"id": "q0"}\n')
    s = merge(out, parts)
    assert (s.written, s.duplicates) == (1, 101)
    assert len(_ids(out)) == 101 == len(set(_ids(out)))


def test_merge_refuses_mixed_configs_and_bad_inputs(tmp_path: Path) -> None:
    a = _shard_outputs(tmp_path / "a", 2, ["x", "y", "z"], CFG)
    b = _shard_outputs(tmp_path / "b", 2, ["x", "y", "z"], {**CFG, "model": "other"})
    with pytest.raises(ConfigMismatch, match="model"):
        merge(tmp_path / "m.jsonl", [a[0], b[1]])
    assert not (tmp_path / "m.jsonl").exists()
    with pytest.raises(VpdError, match="not found"):
        merge(tmp_path / "m.jsonl", [tmp_path / "missing.jsonl"])
    with pytest.raises(VpdError, match="also an input"):
        merge(a[0], a)


def test_jsonl_writer_repairs_before_appending(tmp_path: Path) -> None:
    p = tmp_path / "w.jsonl"
    p.write_text('{"id":"a"}\n{"id":"b", "x')
    with JsonlWriter(p) as w:
        w.write({"id": "c", "text": "ü"})
    assert _ids(p) == ["a", "c"]
    assert "ü" in p.read_text(encoding="utf-8")


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.text(min_size=1, max_size=15), min_size=1, max_size=30, unique=True))
def test_any_id_round_trips_through_writer_and_id_scan(tmp_path_factory, ids: list[str]) -> None:
    p = tmp_path_factory.mktemp("rt") / "o.jsonl"
    with JsonlWriter(p) as w:
        for i, rid in enumerate(ids):
            # Alternate dict (json.dumps) and pydantic (model_dump_json) serialization.
            w.write({"id": rid, "v": i} if i % 2 else Question(**_q(0, id=rid)))
    assert list(iter_ids(p)) == ids
    done = read_done_ids(p)
    assert all(rid in done for rid in ids)


def test_done_ids_drops_repeated_hashes() -> None:
    import numpy as np

    keys = ["a", "b", "a", "c", "b", "a"]
    done = DoneIds(np.array([stable_hash(k) for k in keys], dtype=np.uint64))
    assert len(done) == 3 and all(k in done for k in "abc") and "d" not in done
    assert len(DoneIds(np.array([stable_hash("x")], dtype=np.uint64))) == 1
    assert len(DoneIds(np.empty(0, np.uint64))) == 0 and "x" not in DoneIds()
