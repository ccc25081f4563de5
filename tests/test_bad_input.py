"""Bad input never costs work: a corpus of damaged inputs, one per verb and kind of damage.

Two kinds of case, both through the console-script entry (``vpd.cli.main``):

- a FATAL input (wrong file, empty file, bad flag or recipe key, an output that cannot be
  made): exit code 2, ONE line on stderr that names the problem, no traceback, and nothing
  expensive started;
- DAMAGED lines inside a good input (broken JSON, an image that does not decode): exit 0,
  every good record in the output, each bad one in the rejects file with its reason, and
  the summary line says how many were rejected.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import main_vpd, read_jsonl, read_rejects, run_vpd, write_jsonl
from tests.template_programs import viper_program
from vpd.cli import app


def _one_line_error(code: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], (needle, err)
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small run's stage files, made by the real commands: questions (synth), samples
    (hand-written correct programs), executions, verified programs, SFT records."""
    d = tmp_path_factory.mktemp("bad-input")
    code, err = main_vpd("data", "synth", "--out", str(d / "data"), "--n", "12", "--no-progress")
    assert code == 0, err
    questions = d / "data" / "train.jsonl"
    samples = write_jsonl(
        d / "samples.jsonl",
        [
            {"id": f"{q['id']}#0", "qid": q["id"], "k": 0, "program": viper_program(q)}
            for q in read_jsonl(questions)
        ],
    )
    steps = [
        ("execute", str(samples), "--questions", str(questions), "--out", str(d / "exec.jsonl")),
        ("verify", str(d / "exec.jsonl"), "--samples", str(samples), "--questions",
         str(questions), "--out", str(d / "verified.jsonl")),
        ("rationalize", str(d / "verified.jsonl"), "--questions", str(questions), "--out",
         str(d / "sft.jsonl"), "--add-labelled"),
    ]  # fmt: skip
    for args in steps:
        code, err = main_vpd(*args, "--no-progress")
        assert code == 0, err
    return {
        "dir": d,
        "questions": questions,
        "samples": samples,
        "executions": d / "exec.jsonl",
        "verified": d / "verified.jsonl",
        "sft": d / "sft.jsonl",
        "empty": write_jsonl(d / "empty.jsonl", []),
        "a_file": write_jsonl(d / "a-file", []),  # a file where a folder is needed
    }


def _recipe(tmp: Path, text: str) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


UNDER_A_FILE = "it is a file, not a folder"  # an --out whose parent is a file
GOOD_RECIPE = "data: {n: 10, progress: false}\nsample: {k: 1}\ntune: {epochs: 1}\n"

# (case id, argv builder, the words the one-line error must hold). ``f``: the fixture's
# files, ``t``: a fresh temporary folder.
FATAL: list[tuple[str, Any, str]] = [
    # vpd run: every recipe key checked before the first stage runs
    ("run-set-typo", lambda f, t: ["run", str(_recipe(t, GOOD_RECIPE)), "--run-dir", str(t / "r"),
                                   "--set", "tune.epochz=2"], "unknown option(s) ['epochz']"),
    ("run-set-type", lambda f, t: ["run", str(_recipe(t, GOOD_RECIPE)), "--run-dir", str(t / "r"),
                                   "--set", "tune.lr=abc"],
     "tune.lr: Input should be a valid number"),
    ("run-set-unknown-key", lambda f, t: ["run", str(_recipe(t, GOOD_RECIPE)), "--run-dir",
                                          str(t / "r"), "--set", "sample.nosuch=1"],
     "recipe section 'sample': unknown option(s) ['nosuch']"),
    ("run-recipe-range", lambda f, t: ["run", str(_recipe(t, "data: {n: 10}\nsample: {k: -1}\n")),
                                       "--run-dir", str(t / "r")], "sample.k: Input should be"),
    ("run-recipe-folder", lambda f, t: ["run", str(t)], "a recipe is a YAML file, got a directory"),
    ("run-recipe-yaml", lambda f, t: ["run", str(_recipe(t, "data: [n: 1\n"))], "not valid YAML"),
    ("run-recipe-empty", lambda f, t: ["run", str(_recipe(t, ""))], "has no stage sections"),
    ("run-recipe-missing", lambda f, t: ["run", str(t / "nope.yaml")], "recipe not found"),
    ("run-only-unknown", lambda f, t: ["run", str(_recipe(t, GOOD_RECIPE)), "--only", "smaple"],
     "--only: unknown stage"),
    # usage errors: typer's boxes become one line that names the flag
    ("cli-unknown-command", lambda f, t: ["smaple"], "No such command 'smaple'"),
    ("cli-missing-argument", lambda f, t: ["sample"], "Missing argument"),
    ("synth-n-not-int", lambda f, t: ["data", "synth", "--out", str(t), "--n", "abc"],
     "Invalid value for '--n'"),
    ("synth-n-zero", lambda f, t: ["data", "synth", "--out", str(t), "--n", "0"],
     "--n: Input should be greater than or equal to 1"),
    ("synth-out-under-a-file", lambda f, t: ["data", "synth", "--out", str(f["a_file"] / "d"),
                                             "--n", "5", "--no-progress"], UNDER_A_FILE),
    # data import
    ("import-empty", lambda f, t: ["data", "import", str(f["empty"]), "--out", str(t / "q.jsonl"),
                                   "--no-progress"], "holds no rows"),
    ("import-missing", lambda f, t: ["data", "import", str(t / "nope.jsonl"), "--out",
                                     str(t / "q.jsonl")], "not found"),
    ("import-out-under-a-file", lambda f, t: ["data", "import", str(f["questions"]), "--out",
                                              str(f["a_file"] / "q.jsonl"), "--no-progress"],
     UNDER_A_FILE),
    # sample (an unreachable server: nothing may get as far as a request)
    ("sample-k-negative", lambda f, t: ["sample", str(f["questions"]), "--out", str(t / "s.jsonl"),
                                        "--k", "-1"], "--k: Input should be greater than or equal"),
    ("sample-max-tokens-zero", lambda f, t: ["sample", str(f["questions"]), "--out",
                                             str(t / "s.jsonl"), "--max-tokens", "0"],
     "--max-tokens: Input should be greater than or equal to 1"),
    ("sample-limit-zero", lambda f, t: ["sample", str(f["questions"]), "--out", str(t / "s.jsonl"),
                                        "--limit", "0"], "--limit: Input should be greater than"),
    ("sample-empty-questions", lambda f, t: ["sample", str(f["empty"]), "--out", str(t / "s.jsonl"),
                                             "--base-url", "http://127.0.0.1:9/v1"],
     "holds no records"),
    ("sample-samples-as-questions", lambda f, t: ["sample", str(f["samples"]), "--out",
                                                  str(t / "s.jsonl"), "--base-url",
                                                  "http://127.0.0.1:9/v1"],
     "holds samples (vpd sample), but this input takes questions"),
    ("sample-folder-as-questions", lambda f, t: ["sample", str(t), "--out", str(t / "s.jsonl"),
                                                 "--base-url", "http://127.0.0.1:9/v1"],
     "got a directory"),
    # execute
    ("execute-folder-as-samples", lambda f, t: ["execute", str(t), "--questions",
                                                str(f["questions"]), "--out", str(t / "e.jsonl")],
     "got a directory"),
    ("execute-empty-samples", lambda f, t: ["execute", str(f["empty"]), "--questions",
                                            str(f["questions"]), "--out", str(t / "e.jsonl")],
     "holds no records"),
    ("execute-executions-as-samples", lambda f, t: ["execute", str(f["executions"]), "--questions",
                                                    str(f["questions"]), "--out",
                                                    str(t / "e.jsonl")],
     "holds executions (vpd execute), but this input takes samples"),
    ("execute-workers-zero", lambda f, t: ["execute", str(f["samples"]), "--questions",
                                           str(f["questions"]), "--out", str(t / "e.jsonl"),
                                           "--workers", "0"], "--workers: Input should be greater"),
    ("execute-out-under-a-file", lambda f, t: ["execute", str(f["samples"]), "--questions",
                                               str(f["questions"]), "--out",
                                               str(f["a_file"] / "e.jsonl")], UNDER_A_FILE),
    ("execute-out-is-a-folder", lambda f, t: ["execute", str(f["samples"]), "--questions",
                                              str(f["questions"]), "--out", str(t)],
     "got a directory"),
    # verify
    ("verify-empty-questions", lambda f, t: ["verify", str(f["executions"]), "--samples",
                                             str(f["samples"]), "--questions", str(f["empty"]),
                                             "--out", str(t / "v.jsonl")], "holds no records"),
    ("verify-samples-as-executions", lambda f, t: ["verify", str(f["samples"]), "--samples",
                                                   str(f["samples"]), "--questions",
                                                   str(f["questions"]), "--out",
                                                   str(t / "v.jsonl")],
     "holds samples (vpd sample), but this input takes executions"),
    ("verify-policy", lambda f, t: ["verify", str(f["executions"]), "--samples", str(f["samples"]),
                                    "--questions", str(f["questions"]), "--out",
                                    str(t / "v.jsonl"), "--policy", "best"],
     "--policy: Input should be"),
    # rationalize
    ("rationalize-executions-as-verified", lambda f, t: ["rationalize", str(f["executions"]),
                                                         "--questions", str(f["questions"]),
                                                         "--out", str(t / "sft.jsonl")],
     "holds executions (vpd execute), but this input takes verified programs"),
    ("rationalize-empty-verified", lambda f, t: ["rationalize", str(f["empty"]), "--questions",
                                                 str(f["questions"]), "--out",
                                                 str(t / "sft.jsonl")], "holds no records"),
    ("rationalize-out-under-a-file", lambda f, t: ["rationalize", str(f["verified"]),
                                                   "--questions", str(f["questions"]), "--out",
                                                   str(f["a_file"] / "sft.jsonl")],
     UNDER_A_FILE),
    # merge
    ("merge-folder-input", lambda f, t: ["merge", str(t), "--out", str(t / "m.jsonl")],
     "directory"),
    ("merge-empty-input", lambda f, t: ["merge", str(f["empty"]), "--out", str(t / "m.jsonl")],
     "empty"),
    # export
    ("export-empty-sft", lambda f, t: ["export", str(f["empty"]), "--format", "trl", "--out",
                                       str(t / "x")], "holds no records"),
    ("export-executions-as-sft", lambda f, t: ["export", str(f["executions"]), "--format", "hf",
                                               "--out", str(t / "x")],
     "holds executions (vpd execute), but this input takes SFT records"),
    ("export-format", lambda f, t: ["export", str(f["sft"]), "--format", "axolotl", "--out",
                                    str(t / "x")], "--format: Input should be 'llamafactory'"),
    ("export-out-under-a-file", lambda f, t: ["export", str(f["sft"]), "--format", "llamafactory",
                                              "--out", str(f["a_file"] / "x"), "--no-progress"],
     UNDER_A_FILE),
    # status, view, report
    ("status-not-a-run", lambda f, t: ["status", str(t)], "is not a vpd run directory"),
    ("view-not-a-run", lambda f, t: ["view", str(t)], "is it a run?"),
    ("view-empty-questions", lambda f, t: ["view", "--questions", str(f["empty"]), "--verified",
                                           str(f["verified"]), "--out", str(t / "site")],
     "no questions to show"),
    ("report-not-a-run", lambda f, t: ["report", str(t)], "is not a vpd run directory"),
    ("report-empty-ratings", lambda f, t: ["report", "--ratings", str(f["empty"])], "no ratings"),
]  # fmt: skip


@pytest.mark.parametrize("build,needle", [c[1:] for c in FATAL], ids=[c[0] for c in FATAL])
def test_fatal_input_is_one_line_and_exit_2(
    files: dict[str, Path], tmp_path: Path, build: Any, needle: str
) -> None:
    code, err = main_vpd(*build(files, tmp_path))
    _one_line_error(code, err, needle)
    # A run refused for its options started no stage: not even the data stage's folder.
    assert not (tmp_path / "r" / "data").exists()


def test_the_corpus_covers_every_verb(tmp_path: Path) -> None:
    names = ("questions", "samples", "executions", "verified", "sft", "empty", "a_file")
    verbs = {c[1](dict.fromkeys(names, tmp_path), tmp_path)[0] for c in FATAL}
    commands = {c.name or c.callback.__name__ for c in app.registered_commands} | {"data"}
    assert len(FATAL) >= 40
    # their own tests check these (tune-writer: tests/test_writer.py)
    assert commands - verbs <= {"tune", "tune-writer", "eval", "sdvp", "serve"}


def test_a_real_process_prints_one_line_on_stderr_and_nothing_on_stdout(
    files: dict[str, Path], tmp_path: Path
) -> None:
    r = run_vpd("execute", str(files["executions"]), "--questions", str(files["questions"]),
                "--out", str(tmp_path / "e.jsonl"))  # fmt: skip
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {files['executions']} holds executions (vpd execute), but this input takes "
        "samples (vpd sample)"
    ]


# ----------------------------------------------------------------------------- damaged lines


def _corrupt(path: Path) -> None:
    path.write_text("this is text, not a PNG\n")


def _copy_data(files: dict[str, Path], tmp: Path) -> Path:
    """The fixture's question set, copied (its images are damaged by the test)."""
    shutil.copytree(files["questions"].parent, tmp / "data")
    return tmp / "data" / "train.jsonl"


def test_execute_rejects_an_unreadable_image_and_runs_it_once_restored(
    files: dict[str, Path], tmp_path: Path
) -> None:
    questions = _copy_data(files, tmp_path)
    first = read_jsonl(questions)[0]
    image = questions.parent / first["image"]
    saved = image.read_bytes()
    _corrupt(image)
    out = tmp_path / "e.jsonl"
    args = ("execute", str(files["samples"]), "--questions", str(questions), "--out", str(out),
            "--no-progress")  # fmt: skip
    code, err = main_vpd(*args)
    assert code == 0, err
    on_image = {q["id"] for q in read_jsonl(questions) if q["image"] == first["image"]}
    done = {r["qid"] for r in read_jsonl(out)}
    assert done == {q["id"] for q in read_jsonl(questions)} - on_image
    reasons = {r["id"]: r["reason"] for r in read_rejects(out)}
    assert set(reasons) == {f"{q}#0" for q in on_image}
    assert all(r.startswith("not an image file") for r in reasons.values())
    assert f"{len(on_image)} rejected" in err
    # Restored: the same command executes just those, without --force.
    image.write_bytes(saved)
    before = out.read_text()
    code, err = main_vpd(*args)
    assert code == 0, err
    assert out.read_text().startswith(before)
    assert {r["qid"] for r in read_jsonl(out)} == {q["id"] for q in read_jsonl(questions)}
    assert not read_rejects(out)


def test_execute_reports_a_bad_question_line(files: dict[str, Path], tmp_path: Path) -> None:
    questions = _copy_data(files, tmp_path)
    with open(questions, "a", encoding="utf-8") as f:
        f.write('{"id": "broken", "question": 3}\n')
    out = tmp_path / "e.jsonl"
    code, err = main_vpd("execute", str(files["samples"]), "--questions", str(questions),
                         "--out", str(out), "--no-progress")  # fmt: skip
    assert code == 0 and "1 rejected" in err, err
    (rej,) = read_rejects(out)
    assert rej["id"] == "broken" and rej["reason"].startswith("questions: invalid record")
    assert len(read_jsonl(out)) == len(read_jsonl(files["samples"]))


def test_import_rejects_a_corrupt_png(files: dict[str, Path], tmp_path: Path) -> None:
    questions = _copy_data(files, tmp_path)
    rows = read_jsonl(questions)
    _corrupt(questions.parent / rows[0]["image"])
    out = tmp_path / "imported.jsonl"
    code, err = main_vpd("data", "import", str(questions), "--out", str(out), "--no-progress")
    assert code == 0, err
    bad = {r["id"] for r in rows if r["image"] == rows[0]["image"]}
    assert {r["id"] for r in read_jsonl(out)} == {r["id"] for r in rows} - bad
    assert {r["id"] for r in read_rejects(out)} == bad
    assert all("not an image file" in r["reason"] for r in read_rejects(out))


def test_rationalize_rejects_a_question_whose_image_does_not_decode(
    files: dict[str, Path], tmp_path: Path
) -> None:
    questions = _copy_data(files, tmp_path)
    rows = read_jsonl(questions)
    _corrupt(questions.parent / rows[0]["image"])
    out = tmp_path / "sft.jsonl"
    code, err = main_vpd("rationalize", str(files["verified"]), "--questions", str(questions),
                         "--out", str(out), "--add-labelled", "--no-progress")  # fmt: skip
    assert code == 0, err
    bad = {r["id"] for r in rows if r["image"] == rows[0]["image"]}
    assert "rejected input lines" in err
    assert {r["qid"] for r in read_jsonl(out)} == {r["id"] for r in rows} - bad
    assert bad <= {r["id"] for r in read_rejects(out)}


def test_export_rejects_a_corrupt_image_and_names_its_rejects_file(
    files: dict[str, Path], tmp_path: Path
) -> None:
    sft = tmp_path / "sft.jsonl"
    base = files["sft"].parent  # image paths are relative to the SFT file's folder
    recs = [{**r, "image": str((base / r["image"]).resolve())} for r in read_jsonl(files["sft"])]
    broken = tmp_path / "broken.png"
    _corrupt(broken)
    recs[0] = {**recs[0], "image": str(broken)}
    write_jsonl(sft, recs)
    out = tmp_path / "x"
    code, err = main_vpd("export", str(sft), "--format", "hf", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert f"1 rejected (reasons in {out / 'rejects.jsonl'})" in " ".join(err.split())
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["id"] == recs[0]["id"] and "not an image file" in rej["reason"]
    import datasets

    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == len(recs) - 1


def test_verify_rejects_a_broken_line_and_keeps_the_rest(
    files: dict[str, Path], tmp_path: Path
) -> None:
    executions = tmp_path / "exec.jsonl"
    lines = files["executions"].read_text().splitlines()
    executions.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    out = tmp_path / "v.jsonl"
    code, err = main_vpd("verify", str(executions), "--samples", str(files["samples"]),
                         "--questions", str(files["questions"]), "--out", str(out),
                         "--no-progress")  # fmt: skip
    assert code == 0 and "1 rejected input lines" in err, err
    assert {json.loads(x)["id"] for x in lines} == {r["id"] for r in read_jsonl(out)}


def test_an_empty_shard_is_not_an_error(files: dict[str, Path], tmp_path: Path) -> None:
    """A shard that owns no question (more shards than questions) finishes with an empty
    file, which the shard's next stage takes; without --shard an empty input is refused."""
    out = tmp_path / "e.0.jsonl"
    code, err = main_vpd("execute", str(files["empty"]), "--questions", str(files["questions"]),
                         "--out", str(out), "--shard", "0/4", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert out.exists() and out.read_text() == ""
