"""`vpd sdvp`: sub-tasks from traces of both syntaxes, the Teacher Input Adapter, the
resumable teacher step (a real kill -9), the student records, and a whole small run.

The teacher and student are tiny random VLMs (built from configs in seconds), so the run
checks the plumbing and the measurements' arithmetic, not that distillation helps: that is
the README's CPU demo.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    REPO,
    check_marker_summaries,
    check_summary,
    read_jsonl,
    vpd_argv,
    write_jsonl,
)
from tests.template_programs import viper_program, visprog_program
from tests.test_eval import build_tiny_llava
from vpd.errors import VpdError
from vpd.metrics import paired_bootstrap
from vpd.records import Execution, Sft, SubTask, ToolCall
from vpd.sdvp import SdvpConfig, run_sdvp
from vpd.sdvp.collect import collect_subtasks, trace_subtasks
from vpd.sdvp.eval import build_report
from vpd.sdvp.images import pixel_box
from vpd.sdvp.teacher import pointer_prompt, teacher_answer, teacher_input
from vpd.tools.backends.vlm import pointer_width, view_image


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("teacher"), seed=1)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("student"), seed=2)


def _samples(questions: list[dict[str, Any]], dup: bool = False) -> list[dict[str, Any]]:
    """Template programs: ViperGPT (k=0), VisProg where the template has one (k=1), and
    optionally the ViperGPT program again (k=2, as an LLM sampling it twice would)."""
    rows = []
    for q in questions:
        rows.append({"id": f"{q['id']}#0", "qid": q["id"], "k": 0, "program": viper_program(q)})
        vp = visprog_program(q)
        if vp:
            rows.append(
                {"id": f"{q['id']}#1", "qid": q["id"], "k": 1, "program": vp, "syntax": "visprog"}
            )
        if dup:
            rows.append({"id": f"{q['id']}#2", "qid": q["id"], "k": 2, "program": viper_program(q)})
    return rows


@pytest.fixture(scope="module")
def executed(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train and test programs of both syntaxes executed with the synthetic tools."""
    from vpd.execute import ExecuteConfig, run_execute

    root = tmp_path_factory.mktemp("sdvp-exec")
    out = {}
    for split in ("train", "test"):
        qs = read_jsonl(synth_dir / f"{split}.jsonl")
        samples = write_jsonl(root / f"{split}.samples.jsonl", _samples(qs, dup=split == "train"))
        ex = root / f"{split}.executions.jsonl"
        run_execute(
            ExecuteConfig(
                samples=samples,
                questions=synth_dir / f"{split}.jsonl",
                out=ex,
                workers=2,
                progress=False,
            )
        )
        out[f"{split}_samples"], out[f"{split}_executions"] = samples, ex
        out[f"{split}_questions"] = synth_dir / f"{split}.jsonl"
    return out


# ----------------------------------------------------------------------------- collection


def test_trace_subtasks_name_the_object_the_region_was_found_by() -> None:
    trace = [
        ToolCall(name="size", args={"patch": [0, 0, 1, 1]}, result="[256,256]"),
        ToolCall(
            name="find",
            args={"name": "red circle", "patch": [0, 0, 1, 1]},
            result="[[0.1,0.1,0.3,0.3],[0.6,0.6,0.9,0.9]]",
        ),
        ToolCall(name="simple_query", args={"question": "What?", "patch": [0.1, 0.1, 0.3, 0.3]}),
        ToolCall(name="crop", args={"patch": [0, 0, 1, 1]}, result="[0.6,0.6,0.9,0.9]"),
        ToolCall(
            name="verify_property",
            args={"name": "circle", "prop": "red", "patch": [0.61, 0.6, 0.9, 0.9]},
        ),
        ToolCall(name="simple_query", args={"question": "Hm?", "patch": [0.0, 0.0, 0.5, 0.5]}),
        ToolCall(name="simple_query", args={"question": "All?", "patch": [0, 0, 1, 1]}),
        ToolCall(
            name="best_text_match", args={"options": ["a", "b"], "patch": [0.1, 0.1, 0.3, 0.3]}
        ),
    ]
    got = trace_subtasks(trace, ["simple_query", "verify_property"])
    assert got == [
        ("simple_query", {"question": "What?"}, [0.1, 0.1, 0.3, 0.3], "red circle"),
        ("verify_property", {"name": "circle", "prop": "red"}, [0.61, 0.6, 0.9, 0.9], "red circle"),
        ("simple_query", {"question": "Hm?"}, [0.0, 0.0, 0.5, 0.5], None),  # IoU 0.16
        ("simple_query", {"question": "All?"}, [0.0, 0.0, 1.0, 1.0], None),  # whole image
    ]  # best_text_match is not among the chosen ops


def test_subtasks_from_viper_and_visprog_traces(executed: dict[str, Path]) -> None:
    ops = ["simple_query", "verify_property", "best_text_match"]
    subs = collect_subtasks(executed["train_executions"], executed["train_questions"], ops)
    qs = {q["id"]: q for q in read_jsonl(executed["train_questions"])}
    execs = {e["id"]: Execution.model_validate(e) for e in read_jsonl(executed["train_executions"])}
    assert subs and len({s.id for s in subs}) == len(subs)
    assert {s.op for s in subs} == set(ops)
    by_q: dict[str, list[SubTask]] = {}
    for s in subs:
        for qid in s.qids:
            by_q.setdefault(qid, []).append(s)
    checked = 0
    for qid, q in qs.items():
        if not q["meta"]["template"].startswith("attribute_") or qid not in by_q:
            continue
        viper, visprog = execs.get(f"{qid}#0"), execs.get(f"{qid}#1")
        if viper is None or visprog is None or viper.status != "ok":
            continue
        found = [c for c in viper.trace if c.name == "find"]
        boxes = json.loads(found[0].result)
        if not boxes:
            continue
        desc = found[0].args["name"]
        mine = {s.op: s for s in by_q[qid]}
        # ViperGPT: patches[0].best_text_match(...) on the first found box;
        # VisProg: LOC -> CROP -> VQA, a simple_query on the same region.
        assert mine["best_text_match"].region == boxes[0]
        assert mine["best_text_match"].object == desc
        assert mine["simple_query"].region == boxes[0]
        assert mine["simple_query"].object == desc
        assert mine["simple_query"].question.startswith("What ")
        assert q["meta"].get("qtype", q["meta"].get("type")) in mine["simple_query"].qtypes
        assert Path(mine["simple_query"].image).is_file()
        checked += 1
    assert checked >= 2
    # The k=2 duplicate of each ViperGPT program made the same calls: no new sub-task.
    only_first = [e for e in read_jsonl(executed["train_executions"]) if not e["id"].endswith("#2")]
    path = write_jsonl(executed["train_executions"].with_name("nodup.jsonl"), only_first)
    assert [s.id for s in collect_subtasks(path, executed["train_questions"], ops)] == [
        s.id for s in subs
    ]


def test_held_out_types_are_marked(executed: dict[str, Path]) -> None:
    ops = ["simple_query", "verify_property", "best_text_match"]
    subs = collect_subtasks(
        executed["train_executions"], executed["train_questions"], ops, ["yesno"]
    )
    held = [s for s in subs if s.held_out]
    assert held and all("yesno" in s.qtypes for s in held)
    assert all("yesno" not in s.qtypes for s in subs if not s.held_out)
    assert {s.op for s in held} == {"verify_property"}  # what yes/no programs ask


# ----------------------------------------------------------------------------- adapter


@pytest.mark.parametrize(
    ("question", "name", "boxed", "want"),
    [
        ("What color is it?", "circle", True, "What color is the circle in the box?"),
        ("What color is it?", "circle", False, "What color is the circle?"),
        ("What shape is this?", "red shape", True, "What shape is the red shape in the box?"),
        ("Is the circle red?", "circle", True, "Is the circle in the box red?"),
        ("Is the circle red?", "circle", False, "Is the circle red?"),
        ("Is it red, blue or green?", "star", True, "Is the star in the box red, blue or green?"),
        ("What is this?", None, True, "What is the object in the box?"),
        ("What is this?", None, False, "What is this?"),
        ("How many dots are there?", None, True, "How many dots are there in the box?"),
        ("How many dots?", "square", True, "Look at the square in the box. How many dots?"),
        ("What shape is this?", "shape", True, "What shape is the shape in the box?"),
        (
            "What is the shape of the star?",
            "star",
            True,
            "What is the shape of the star in the box?",
        ),
        ("What color is the shape?", "red star", False, "What color is the red star?"),
        ("What size is its left part?", None, True, "What size is its left part in the box?"),
    ],
)
def test_pointer_prompt(question: str, name: str | None, boxed: bool, want: str) -> None:
    assert pointer_prompt(question, name, boxed) == want


def test_teacher_input_crop_and_pointer_on_pixels(tmp_path: Path) -> None:
    rgb = np.full((100, 200, 3), 240, np.uint8)
    rgb[20:40, 30:70] = (0, 200, 0)  # a green box: x 30..70, y 20..40 from the top
    pil = Image.fromarray(rgb)
    region = [30 / 200, 60 / 100, 70 / 200, 80 / 100]  # ViperGPT 0..1, y up
    assert pixel_box(region, (200, 100)) == (30, 60, 70, 80)
    sub = SubTask(
        id="st-x",
        image="unused.png",
        op="simple_query",
        args={"question": "What color is it?"},
        region=region,
        question="What color is it?",
        object="rectangle",
    )
    crop, q = teacher_input(sub, pil, "crop", rewrite=False)
    assert q == "What color is it?"
    assert np.array_equal(np.asarray(crop), rgb[20:40, 30:70])
    boxed, q = teacher_input(sub, pil, "pointer", rewrite=True)
    assert q == "What color is the rectangle in the box?"
    out = np.asarray(boxed)
    assert out.shape == rgb.shape
    assert np.array_equal(out[20:40, 30:70], rgb[20:40, 30:70])  # the object is not painted
    lw = pointer_width(200, 100)
    assert (out[20 - lw : 20, 30:70] == (255, 0, 0)).all()  # the frame above it
    assert (out[20:40, 70 : 70 + lw] == (255, 0, 0)).all()  # and right of it
    assert np.array_equal(out[:10], rgb[:10]) and np.array_equal(out[:, 100:], rgb[:, 100:])
    assert np.array_equal(np.asarray(view_image(pil, (30, 60, 70, 80), "pointer")), out)
    _, q = teacher_input(sub, pil, "crop", rewrite=True)
    assert q == "What color is the rectangle?"  # named, but no box to point at


def test_teacher_answers_become_op_results() -> None:
    assert teacher_answer("verify_property", {}, "Yes.") == ("yes", "")
    assert teacher_answer("verify_property", {}, "green") == (None, "not a yes/no answer")
    opts = {"options": ["red", "blue"]}
    assert teacher_answer("best_text_match", opts, "It is blue") == ("blue", "")
    assert teacher_answer("best_text_match", opts, "green")[0] is None
    assert teacher_answer("simple_query", {}, "So the answer is Red.") == ("red", "")
    assert teacher_answer("simple_query", {}, "  ") == (None, "empty answer")


# ----------------------------------------------------------------------------- report


def test_paired_bootstrap_and_cross_task_check(tmp_path: Path) -> None:
    same = paired_bootstrap([0, 1, 0, 1], [0, 1, 0, 1])
    assert (same["lo"], same["hi"]) == (0.0, 0.0)
    r = paired_bootstrap([1.0] * 20 + [0.0] * 10, [0.0] * 30, n_boot=2000)
    assert 0.4 < r["lo"] <= r["hi"] < 0.9
    cfg = SdvpConfig(
        executions=tmp_path / "e",
        questions=tmp_path / "q",
        teacher="t",
        out=tmp_path,
        holdout_types=["yesno"],
    )
    qtypes = {f"a{i}": "attribute" for i in range(20)} | {f"y{i}": "yesno" for i in range(20)}
    before = dict.fromkeys(qtypes, 0.5)
    after = {q: (1.0 if t == "attribute" else 0.0) for q, t in qtypes.items()}
    rep = build_report(
        cfg, {"before": before, "pointer": after, "teacher": after}, qtypes, "pointer"
    )
    assert rep["after"]["accuracy"] == 0.5 and rep["after"]["per_type"]["attribute"]["n"] == 20
    assert rep["distilled_types"]["diff"] == 0.5 and rep["distilled_types"]["ci95"] == [0.5, 0.5]
    ho = rep["held_out"]
    assert ho["before"] == 0.5 and ho["after"] == 0.0 and ho["ok"] is False  # a real drop
    same = build_report(
        cfg, {"before": before, "pointer": before, "teacher": after}, qtypes, "pointer"
    )
    assert same["held_out"]["ok"] is True and same["held_out"]["diff"] == 0.0


# ----------------------------------------------------------------------------- resume


def _many_subtasks(synth_dir: Path, tmp_path: Path, per_image: int) -> tuple[Path, Path]:
    """Executions whose traces hold ``per_image`` distinct simple_query calls per image."""
    qs = read_jsonl(synth_dir / "train.jsonl")
    images = {}
    for q in qs:
        images.setdefault(q["image"], q)
    rows = []
    for n, q in enumerate(images.values()):
        trace = [
            {
                "name": "simple_query",
                "args": {"question": f"What color is shape {i}?", "patch": [0, 0, 1, 1]},
                "result": '"red"',
            }
            for i in range(per_image)
        ]
        rows.append({"id": f"{q['id']}#0", "qid": q["id"], "status": "ok", "trace": trace})
        assert n < 50
    return write_jsonl(tmp_path / "exec.jsonl", rows), synth_dir / "train.jsonl"


def test_teacher_step_resumes_after_kill_9(
    synth_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    """kill -9 the teacher step once some answers are on disk; the rerun loses nothing and
    redoes nothing."""
    ex, q = _many_subtasks(synth_dir, tmp_path, per_image=6)
    out = tmp_path / "sdvp"
    args = ["--questions", str(q), "--teacher", str(teacher_dir), "--out", str(out)]
    args += ["--until", "teacher", "--batch-size", "1", "--max-new-tokens", "3"]
    args += ["--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(
        vpd_argv("sdvp", str(ex), *args),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    answers = out / "pointer" / "teacher.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if answers.exists() and answers.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    total = len(collect_subtasks(ex, q, ["simple_query"]))
    before = answers.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    n_before = complete.count(b"\n")
    assert 3 <= n_before < total  # killed half-way: the resume below is exercised

    cfg = SdvpConfig(
        executions=ex,
        questions=q,
        teacher=str(teacher_dir),
        out=out,
        until="teacher",
        batch_size=4,  # a different batch size answers the same (greedy, left-padded)
        max_new_tokens=3,
        device="cpu",
        progress=False,
    )
    rep = run_sdvp(cfg)["variants"]["pointer"]["teacher"]
    assert rep["already_done"] == n_before and rep["answered"] == total - n_before
    after = answers.read_bytes()
    assert after.startswith(complete)  # nothing written before the kill was lost or changed
    recs = read_jsonl(answers)
    assert len(recs) == total and len({r["id"] for r in recs}) == total
    assert all(r["teacher_question"] and r["view"] == "pointer" for r in recs)
    again = run_sdvp(cfg)["variants"]["pointer"]["teacher"]
    assert again["answered"] == 0 and again["already_done"] == total  # nothing redone
    assert answers.read_bytes() == after


def test_teacher_shards_merge_into_one_answer_file(
    synth_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    from vpd.store import merge

    ex, q = _many_subtasks(synth_dir, tmp_path, per_image=2)
    out = tmp_path / "sdvp"
    common = dict(
        executions=ex,
        questions=q,
        teacher=str(teacher_dir),
        out=out,
        until="teacher",
        max_new_tokens=2,
        device="cpu",
        progress=False,
    )
    total = len(collect_subtasks(ex, q, ["simple_query"]))
    got = [
        run_sdvp(SdvpConfig(**common, shard=f"{i}/2"))["variants"]["pointer"]["teacher"]
        for i in range(2)
    ]
    assert sum(g["answered"] for g in got) == total and all(g["answered"] for g in got)
    parts = sorted((out / "pointer").glob("teacher.shard-*-of-2.jsonl"))
    assert len(parts) == 2
    merge(out / "pointer" / "teacher.jsonl", parts)
    whole = run_sdvp(SdvpConfig(**common))["variants"]["pointer"]["teacher"]
    assert whole["answered"] == 0 and whole["already_done"] == total  # the merge is resumed
    with pytest.raises(ValueError, match="--shard splits the teacher step only"):
        SdvpConfig(**{**common, "until": "eval"}, shard="0/2")
    with pytest.raises(VpdError, match="--shard"):
        run_sdvp(SdvpConfig(**common, shard="2/2"))


# ----------------------------------------------------------------------------- a whole run


def test_a_small_run_distils_and_reports(
    executed: dict[str, Path], teacher_dir: Path, student_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sdvp"
    cfg = SdvpConfig(
        executions=executed["train_executions"],
        questions=executed["train_questions"],
        teacher=str(teacher_dir),
        student=str(student_dir),
        out=out,
        eval_samples=executed["test_samples"],
        eval_questions=executed["test_questions"],
        holdout_types=["yesno"],
        max_new_tokens=4,
        tune={"max_steps": 2, "batch_size": 4, "lora": False, "save_steps": 2, "dtype": "float32"},
        device="cpu",
        progress=False,
    )
    rep = run_sdvp(cfg)
    check_summary(run_sdvp, rep)  # the report has the keys its type declares
    v = rep["variants"]["pointer"]
    assert v["teacher"]["answered"] == rep["subtasks"]["distilled"] > 0
    assert rep["subtasks"]["held_out"] > 0
    # The student's records: vpd rationalize's answer format, on the tool's view and question.
    sft = [Sft.model_validate(r) for r in read_jsonl(out / "pointer" / "sft.jsonl")]
    assert len(sft) == v["sft"]["records"] > 0
    subs = {s["id"]: s for s in read_jsonl(out / "subtasks.jsonl")}
    teach = {t["id"]: t for t in read_jsonl(out / "pointer" / "teacher.jsonl")}
    for r in sft:
        sub, t = subs[r.qid], teach[r.qid]
        assert r.task == "answer" and r.messages[0]["content"][0] == {"type": "image"}
        assert r.messages[0]["content"][1]["text"] == (
            f"{sub['question']}\nAnswer the question using a single word or phrase."
        )
        assert r.messages[1]["content"][0]["text"] == t["answer"]
        assert not sub["held_out"]
        img = np.asarray(Image.open(out / "pointer" / r.image))
        with Image.open(sub["image"]) as full:
            box = pixel_box(sub["region"], full.size)
            assert np.array_equal(img, np.asarray(view_image(full.convert("RGB"), box, "crop")))
    assert (out / "pointer" / "student" / "final" / "config.json").exists()
    # The report's accuracies, worked out by hand from the verified programs each arm's
    # tools wrote: a question scores the mean of its programs' scores, an arm the mean of
    # its questions (the report shows 4 places).
    qtype = {q["id"]: q["meta"]["qtype"] for q in read_jsonl(executed["test_questions"])}
    per_q: dict[str, dict[str, float]] = {}
    for key, folder in (("before", "before"), ("after", "pointer"), ("teacher", "teacher")):
        programs: dict[str, list[float]] = {}
        for r in read_jsonl(out / "eval" / folder / "verified.jsonl"):
            programs.setdefault(r["qid"], []).append(r["score"])
        per_q[key] = {q: sum(s) / len(s) for q, s in programs.items()}
    qids = sorted(per_q["before"])
    assert rep["questions"] == len(qids) == len(qtype) > 0
    assert all(sorted(scores) == qids for scores in per_q.values())

    def acc(key: str, ids: list[str]) -> float:
        return round(sum(per_q[key][q] for q in ids) / len(ids), 4)

    types = {t: [q for q in qids if qtype[q] == t] for t in sorted(set(qtype.values()))}
    for key in per_q:
        assert rep[key]["accuracy"] == acc(key, qids) and rep[key]["n"] == len(qids)
        assert rep[key]["per_type"] == {
            t: {"accuracy": acc(key, ids), "n": len(ids)} for t, ids in types.items()
        }
    diff = sum(per_q["after"][q] - per_q["before"][q] for q in qids) / len(qids)
    assert rep["after"]["vs_before"]["diff"] == pytest.approx(diff, abs=5e-5)
    assert rep["after"]["vs_before"]["ci95"][0] <= rep["after"]["vs_before"]["diff"]
    held = types["yesno"]
    assert rep["held_out"]["types"] == ["yesno"] and rep["held_out"]["n"] == len(held) > 0
    assert (rep["held_out"]["before"], rep["held_out"]["after"]) == (
        acc("before", held),
        acc("after", held),
    )
    seen = [q for q in qids if qtype[q] != "yesno"]
    assert (rep["distilled_types"]["before"], rep["distilled_types"]["after"]) == (
        acc("before", seen),
        acc("after", seen),
    )
    # Not a degenerate run: the synthetic tools answer some questions right on every arm.
    assert all(rep[key]["accuracy"] > 0 for key in per_q)
    assert json.loads((out / "sdvp.json").read_text())["after"] == rep["after"]
    # A rerun finds every step done: nothing new is answered, written or trained.
    again = run_sdvp(cfg)
    va = again["variants"]["pointer"]
    assert va["teacher"]["answered"] == 0 and va["sft"]["new"] == 0 and va["tune"]["skipped"]
    assert again["after"] == rep["after"] and again["before"] == rep["before"]


# ----------------------------------------------------------------------------- CLI


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple:
    from vpd.cli import main

    monkeypatch.setattr(sys, "argv", ["vpd", *args])
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_cli_help_and_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    executed: dict[str, Path],
    tmp_path: Path,
) -> None:
    code, out, _ = _cli(monkeypatch, capsys, "sdvp", "--help")
    assert code == 0 and "Example:" in out and "--holdout-types" in out and "--ablation" in out
    ex, q = str(executed["train_executions"]), str(executed["train_questions"])
    base = [ex, "--questions", q, "--teacher", "t", "--out", str(tmp_path / "o")]
    cases = [
        (["--view", "zoom"], "--view: Input should be 'pointer' or 'crop'"),
        (["--until", "later"], "--until: Input should be 'collect'"),
        (["--tool-opt", "vqa=x"], "set by sdvp itself"),
        (["--ops", "find"], "ops must be some of"),
        (["--tune-set", "lrr=1"], "lrr"),
        (["--tune-set", "init=x"], "set by sdvp itself"),
        (["--eval-samples", ex], "go together"),
        (["--holdout-types", "colour"], "no such question type"),
    ]
    for extra, msg in cases:
        code, _, err = _cli(monkeypatch, capsys, "sdvp", *base, *extra)
        assert code == 2 and msg in err and "Traceback" not in err, (extra, err)
    code, _, err = _cli(monkeypatch, capsys, "sdvp", str(tmp_path / "nope.jsonl"), *base[1:])
    assert code == 2 and "not found" in err
    # A teacher that is no model stops before anything is answered.
    code, _, err = _cli(monkeypatch, capsys, "sdvp", *base, "--until", "teacher")
    assert code == 2 and "model not found: t" in err
    assert not (tmp_path / "o" / "pointer" / "teacher.jsonl").exists()
    # An empty executions file is an input error; executions that never called a VLM op
    # have nothing to distil.
    qid = read_jsonl(executed["train_questions"])[0]["id"]
    no_vlm = {"id": f"{qid}#0", "qid": qid, "status": "ok", "answer": "1", "trace": []}
    for executions, msg in (
        (write_jsonl(tmp_path / "none.jsonl", []), "holds no records"),
        (write_jsonl(tmp_path / "no-vlm.jsonl", [no_vlm]), "no VLM sub-task"),
    ):
        with pytest.raises(VpdError, match=msg):
            run_sdvp(
                SdvpConfig(
                    executions=executions,
                    questions=executed["train_questions"],
                    teacher="t",
                    out=tmp_path / "o2",
                    progress=False,
                )
            )


# ----------------------------------------------------------------------------- vpd run


def test_sdvp_stage_in_a_recipe_and_the_run_report(
    synth_dir: Path, teacher_dir: Path, student_dir: Path, tmp_path: Path
) -> None:
    """`sdvp:` in a recipe: programs for train and test questions (already written here, as
    if by the recipe's program writer; the train ones executed by the stage), the run's
    tuned VLM as the teacher, the report's `sdvp` section with before/after/teacher/held_out."""
    import shutil

    import yaml

    from vpd.pipeline import run_pipeline
    from vpd.report import progress_counts
    from vpd.runpaths import RunPaths

    recipe = {
        "data": {"n": 40, "seed": 0, "progress": False},
        "sample": {"k": 1},
        "execute": {"progress": False},
        "tune": {"init": str(student_dir), "lora": False, "batch_size": 4, "dtype": "float32"},
        "sdvp": {
            "train_limit": 20,
            "holdout_types": ["yesno"],
            "max_new_tokens": 3,
            "device": "cpu",
            "tune": {"max_steps": 2, "save_steps": 2},
            "progress": False,
        },
    }
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    p = RunPaths(run)
    run_pipeline(r, run, only=["data"], report=False)
    train, test = read_jsonl(p.train), read_jsonl(p.test)
    shutil.copytree(teacher_dir, p.model / "final")  # stands in for the VPD-tuned VLM
    p.sdvp.mkdir(parents=True)
    write_jsonl(p.sdvp / "train-samples.jsonl", [s for s in _samples(train[:20]) if s["k"] == 0])
    write_jsonl(p.sdvp_samples, [s for s in _samples(test) if s["k"] == 0])

    markers = run_pipeline(r, run, only=["sdvp"])
    assert check_marker_summaries(run) == ["data", "sdvp"]  # each of its declared type
    train_sampled, executed, test_sampled, sdvp_summary = markers["sdvp"]["summary"]
    assert train_sampled["written"] == test_sampled["written"] == 0  # all there already
    assert executed["written"] == 20 and not p.executions.exists()
    assert sdvp_summary["teacher_model"] == str(p.model / "final")
    assert sdvp_summary["student_model"] == str(student_dir)
    assert set(read_jsonl(p.sdvp / "subtasks.jsonl")[0]["qids"]) <= {q["id"] for q in train[:20]}
    rep = json.loads((run / "report.json").read_text())["sdvp"]
    assert {"before", "after", "teacher", "held_out"} <= set(rep)
    assert rep["held_out"]["types"] == ["yesno"] and rep["questions"] == len(test)
    md = (run / "report.md").read_text()
    assert "## SDVP: stepwise distillation into the tools" in md
    assert "| question type | n | before | after | teacher |" in md and "cross-task check" in md
    assert "sub-tasks" in progress_counts(p)["sdvp"]
    again = run_pipeline(r, run, only=["sdvp"], report=False)  # finished: skipped
    assert again["sdvp"]["finished"] == markers["sdvp"]["finished"]
