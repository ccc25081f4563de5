"""vpd.data.importer: JSONL / CSV / HF-on-disk imports, answer shapes, rejects, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import check_summary, read_jsonl, read_rejects
from vpd.cli import app
from vpd.data.importer import ImportConfig, normalize_answers, run_import
from vpd.errors import ConfigMismatch, VpdError
from vpd.records import Question


def _img(path: Path, color: tuple[int, int, int] = (255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)
    return path


def _run(src: Path, out: Path, **kw: object) -> dict:
    s = run_import(ImportConfig(input=src, out=out, progress=False, **kw))
    check_summary(run_import, s)
    return s


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("red", ["red"]),
        ("  red ", ["red"]),
        (["a", "b"], ["a", "b"]),
        ([{"answer": "2", "answer_confidence": "yes"}, {"answer": "two"}], ["2", "two"]),
        ({"text": ["x", "y"]}, ["x", "y"]),
        (3, ["3"]),
        (2.0, ["2"]),
        (2.5, ["2.5"]),
        (True, ["yes"]),
        ('["a", "b"]', ["a", "b"]),
        ("", []),
    ],
)
def test_normalize_answers(value: object, expected: list[str]) -> None:
    assert normalize_answers(value) == expected


def test_normalize_answers_rejects_odd_types() -> None:
    with pytest.raises(ValueError):
        normalize_answers({"score": 1})
    with pytest.raises(ValueError):
        normalize_answers(None)


def test_jsonl_import_with_rejects_and_resume(tmp_path: Path) -> None:
    _img(tmp_path / "src" / "img" / "a.png")
    rows = [
        {"id": "1", "image": "img/a.png", "question": "Color?", "answers": [{"answer": "red"}]},
        {"image": "img/a.png", "question": "Is it red?", "answers": "yes", "qtype": "yn"},
        {"id": "3", "image": "img/missing.png", "question": "x?", "answers": "no"},
        {"id": "4", "image": "img/a.png", "question": "  ", "answers": "no"},
        {"id": "1", "image": "img/a.png", "question": "dup", "answers": "no"},
        {"id": "6", "image": "img/a.png", "answers": "no"},
        {"id": "7", "image": "img/a.png", "question": "q?"},
    ]
    src = tmp_path / "src" / "q.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad json\n")
    out = tmp_path / "out" / "q.jsonl"
    s = _run(src, out)
    assert (s["written"], s["rejected"], s["read"]) == (2, 6, 8)
    recs = read_jsonl(out, Question)
    assert recs[0].id == "1" and recs[0].answers == ["red"]
    assert recs[1].id.startswith("q-") and recs[1].meta["qtype"] == "yn"
    for r in recs:  # image paths are relative to the output's folder and resolve
        assert r.image == "../src/img/a.png" and (out.parent / r.image).is_file()
        assert r.dataset == "q"
    reasons = {r["line"]: r["reason"] for r in read_rejects(out)}
    assert reasons[3].startswith("missing image file")
    assert reasons[4].startswith("empty question")
    assert reasons[5] == "duplicate id '1'"
    assert reasons[6] == "missing field 'question'"
    assert reasons[7] == "missing field 'answers'"
    assert reasons[8].startswith("malformed JSON")
    # Generated ids are stable: a second import into another file gives the same ids.
    s2 = _run(src, tmp_path / "out" / "again.jsonl")
    assert [r.id for r in read_jsonl(tmp_path / "out" / "again.jsonl", Question)] == [
        r.id for r in recs
    ]
    # Resume: nothing new is written, rejects are reported again.
    s3 = _run(src, out)
    assert (s3["written"], s3["already_done"], s3["rejected"]) == (0, 2, 6)
    assert s2["written"] == 2 and len(read_jsonl(out, Question)) == 2


def test_resume_after_partial_output(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    src = tmp_path / "q.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "image": "a.png", "question": "q?", "answers": "x"}) + "\n"
            for i in range(20)
        )
    )
    out = tmp_path / "o" / "q.jsonl"
    _run(src, out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:7]) + "\n" + lines[7][:10])  # a kill: 7 lines + torn
    s = _run(src, out)
    assert s["written"] == 13 and s["already_done"] == 7
    assert [r.id for r in read_jsonl(out, Question)] == [f"r{i}" for i in range(7)] + [
        f"r{i}" for i in range(7, 20)
    ]


def test_config_change_needs_force(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"id": "1", "image": "a.png", "question": "q", "answers": "a"}))
    out = tmp_path / "o.jsonl"
    _run(src, out)
    with pytest.raises(ConfigMismatch):
        _run(src, out, split="test")
    assert _run(src, out, split="test", force=True)["written"] == 1
    assert read_jsonl(out, Question)[0].split == "test"


def test_csv_import_field_mapping_and_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _img(root / "x.png")
    src = tmp_path / "q.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["qid", "file", "text", "label", "difficulty"])
        w.writerow(["a", "x.png", "How many?", "3", "easy"])
        w.writerow(["b", "x.png", "Which?", '["cat", "kitten"]', "hard"])
        w.writerow(["c", "nope.png", "Missing?", "no", "easy"])
        w.writerow(["d", "x.png", "", "no", "easy"])
    out = tmp_path / "out.jsonl"
    s = _run(
        src,
        out,
        id_field="qid",
        image_field="file",
        question_field="text",
        answers_field="label",
        image_root=root,
        split="val",
        dataset="mycsv",
    )
    assert s["written"] == 2 and s["rejected"] == 2
    a, b = read_jsonl(out, Question)
    assert (a.id, a.answers, a.split, a.dataset) == ("a", ["3"], "val", "mycsv")
    assert a.meta["difficulty"] == "easy" and a.image == "images/x.png"
    assert b.answers == ["cat", "kitten"]
    rej = read_rejects(out)
    assert [r["id"] for r in rej] == ["c", "d"]
    assert rej[0]["line"] == 4 and "missing image file" in rej[0]["reason"]


def test_hf_dataset_on_disk_with_pil_images(tmp_path: Path) -> None:
    import datasets

    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": [{"answer": datasets.Value("string")}],
            "question_id": datasets.Value("int64"),
        }
    )
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = {
        "image": [red, blue, red],
        "question": ["What color?", "What color?", ""],
        "answers": [[{"answer": "red"}], [{"answer": "blue"}, {"answer": "navy"}], []],
        "question_id": [10, 11, 12],
    }
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(data, features=feats),
            "validation": datasets.Dataset.from_dict(
                {k: v[:1] for k, v in data.items()}, features=feats
            ),
        }
    )
    saved = tmp_path / "saved"
    dd.save_to_disk(str(saved))
    out = tmp_path / "o" / "train.jsonl"
    with pytest.raises(VpdError, match="--hf-split"):
        _run(saved, out, id_field="question_id")
    s = _run(saved, out, id_field="question_id", hf_split="train")
    assert s["written"] == 2 and s["rejected"] == 1 and s["images_saved"] == 2
    r10, r11 = read_jsonl(out, Question)
    assert (r10.id, r10.answers, r10.split) == ("10", ["red"], "train")
    assert r11.answers == ["blue", "navy"]
    px = Image.open(out.parent / r11.image).convert("RGB").getpixel((0, 0))
    assert px == (0, 0, 255) and r11.image.startswith("train_images/")
    assert "empty question" in read_rejects(out)[0]["reason"]
    assert "bytes>" in read_rejects(out)[0]["raw"]  # images summarized, not dumped
    # `split` picks the DatasetDict split when it names one.
    out2 = tmp_path / "o" / "val.jsonl"
    assert _run(saved, out2, id_field="question_id", split="validation")["written"] == 1


def test_hf_parquet_file_with_image_bytes(tmp_path: Path) -> None:
    import datasets

    _img(tmp_path / "g.png", (0, 200, 0))
    png = (tmp_path / "g.png").read_bytes()
    ds = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": png, "path": None}, {"bytes": b"junk", "path": None}],
            "q": ["Green?", "Broken?"],
            "a": ["yes", "no"],
        }
    )
    pq = tmp_path / "d.parquet"
    ds.to_parquet(str(pq))
    out = tmp_path / "o.jsonl"
    s = _run(pq, out, image_field="img", question_field="q", answers_field="a")
    assert s["written"] == 1 and s["rejected"] == 1
    (rec,) = read_jsonl(out, Question)
    assert Image.open(tmp_path / rec.image).convert("RGB").getpixel((1, 1)) == (0, 200, 0)
    assert "unreadable image" in read_rejects(out)[0]["reason"]


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(VpdError, match="not found"):
        _run(tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    weird = tmp_path / "q.xyz"
    weird.write_text("x")
    with pytest.raises(VpdError, match="format"):
        _run(weird, tmp_path / "o.jsonl")
    empty_dir = tmp_path / "notads"
    empty_dir.mkdir()
    with pytest.raises(VpdError, match="cannot load"):
        _run(empty_dir, tmp_path / "o.jsonl")


def test_cli_import(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "y"}) + "\n")
    out = tmp_path / "o.jsonl"
    runner = CliRunner()
    res = runner.invoke(
        app, ["data", "import", str(src), "--out", str(out), "--answers-field", "answer"]
    )
    assert res.exit_code == 0, res.output
    assert read_jsonl(out, Question)[0].answers == ["y"]
    res = runner.invoke(app, ["data", "import", str(src), "--out", str(out), "--bogus"])
    assert res.exit_code == 2
