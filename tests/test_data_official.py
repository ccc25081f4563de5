"""`vpd data import --format gqa|vqav2|okvqa|aokvqa|tallyqa|pope|nlvr2` on official-layout files.

The fixtures (tests/fixtures/official/) are small files written from each benchmark's
format description, with bad rows planted: a missing field, a missing image, a duplicate
id, and per format its own (no annotation, a non-integer count, a bad label, a torn line).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import main_vpd, read_jsonl, read_rejects
from vpd.cli import app
from vpd.data.importer import ImportConfig, run_import
from vpd.errors import VpdError
from vpd.records import Question

FIX = Path(__file__).parent / "fixtures" / "official"


def images(root: Path, *names: str) -> Path:
    """Tiny images at ``root/name`` (JPEG or PNG by extension); returns ``root``."""
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (200, 30, 30)).save(p, "PNG" if p.suffix == ".png" else "JPEG")
    return root


def run(fmt: str, src: Path, out: Path, **kw: object) -> dict:
    return run_import(ImportConfig(input=src, out=out, fmt=fmt, progress=False, **kw))


def read(out: Path) -> dict[str, Question]:
    return {q.id: q for q in read_jsonl(out, Question)}


def rejects(out: Path) -> dict[str | None, str]:
    return {r["id"]: r["reason"] for r in read_rejects(out)}


def resolves(out: Path, q: Question, name: str) -> bool:
    """The record's image path (relative to the output folder) is the named file."""
    return (out.parent / q.image).resolve().name == name and (out.parent / q.image).is_file()


# ----------------------------------------------------------------------------- GQA


def test_gqa_balanced_questions(tmp_path: Path) -> None:
    # Images in <root>/images/: the root of the GQA download works as --image-root.
    root = images(tmp_path / "gqa", "images/n161313.jpg", "images/n15740.jpg")
    out = tmp_path / "out" / "gqa.jsonl"
    s = run("gqa", FIX / "gqa" / "testdev_balanced_questions.json", out, image_root=root)
    qs = read(out)
    assert list(qs) == ["201307251", "201640614", "201307252", "05451384"]
    assert (s["written"], s["rejected"], s["read"]) == (4, 3, 7)
    q = qs["201640614"]  # the first of the two entries with this key
    assert q.question == "Which kind of vehicle is it?" and q.answers == ["bus"]
    assert (q.dataset, q.split) == ("gqa", "testdev")
    assert q.meta["qtype"] == "query" and q.meta["types"]["detailed"] == "categoryThis"
    assert q.meta["groups"] == {"global": "vehicle", "local": "15-vehicle_name"}
    assert q.meta["fullAnswer"] == "The vehicle is a bus." and q.meta["imageId"] == "n161313"
    assert "semantic" not in q.meta and "annotations" not in q.meta
    assert qs["201307252"].meta["isBalanced"] is False
    assert qs["05451384"].id == "05451384"  # ids stay strings: leading zero kept
    assert resolves(out, q, "n161313.jpg")
    bad = rejects(out)
    assert bad["20968379"] == "missing field 'question'"
    assert bad["20968380"].startswith("missing image file:") and "n999999.jpg" in bad["20968380"]
    assert bad["201640614"] == "duplicate id '201640614'"


def test_gqa_test_split_without_answers_and_chunk_folder(tmp_path: Path) -> None:
    root = images(tmp_path / "img", "n15740.jpg")
    out = tmp_path / "test.jsonl"
    run("gqa", FIX / "gqa" / "test_balanced_questions.json", out, image_root=root)
    qs = read(out)
    assert [q.answers for q in qs.values()] == [[], []]
    assert qs["201971873"].meta["qtype"] == "query"
    # train_all_questions/ is released as a folder of chunk files of one dict.
    chunks = tmp_path / "train_all_questions"
    chunks.mkdir()
    entry = {"question": "Is it red?", "imageId": "n15740", "answer": "yes", "isBalanced": True}
    for i in range(2):
        (chunks / f"train_all_questions_{i}.json").write_text(json.dumps({f"q{i}": entry}))
    out2 = tmp_path / "train.jsonl"
    s = run("gqa", chunks, out2, image_root=root)
    assert s["written"] == 2 and [q.split for q in read(out2).values()] == ["train", "train"]


# ----------------------------------------------------------------------------- VQA v2 / OK-VQA


def test_vqav2_questions_and_annotations(tmp_path: Path) -> None:
    root = images(
        tmp_path / "coco",
        "val2014/COCO_val2014_000000262148.jpg",
        "val2014/COCO_val2014_000000393225.jpg",
    )
    out = tmp_path / "vqa.jsonl"
    s = run(
        "vqav2",
        FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json",
        out,
        annotations=FIX / "vqav2" / "v2_mscoco_val2014_annotations.json",
        image_root=root,  # the COCO root: val2014/ is found under it
    )
    qs = read(out)
    assert list(qs) == [
        "262148000", "262148001", "262148002", "393225000", "393225001", "393225002"
    ]  # fmt: skip
    assert (s["written"], s["rejected"]) == (6, 4)
    q = qs["393225001"]
    # All ten human answers, in the annotation file's order (answer_id 1..10).
    assert q.answers == ["2", "2", "2", "two", "3", "2", "2", "1", "2", "2"]
    assert q.meta == {
        "image_id": 393225,
        "question_type": "how many",
        "answer_type": "number",
        "multiple_choice_answer": "2",
        "qtype": "number",
    }
    assert (q.dataset, q.split) == ("vqav2", "val2014")
    assert resolves(out, q, "COCO_val2014_000000393225.jpg")
    bad = rejects(out)
    assert bad["393225003"] == "missing field 'question'"
    assert "COCO_val2014_000000999999.jpg" in bad["999999000"]
    assert bad["393225001"] == "duplicate id '393225001'"
    assert bad["393225004"].startswith("no annotation for question 393225004")


def test_vqav2_test_dev_without_annotations(tmp_path: Path) -> None:
    root = images(tmp_path / "test2015", "COCO_test2015_000000000001.jpg")
    out = tmp_path / "td.jsonl"
    src = FIX / "vqav2" / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    s = run("vqav2", src, out, image_root=root)
    qs = read(out)
    assert s["written"] == 2 and all(q.answers == [] for q in qs.values())
    assert qs["10"].split == "test-dev2015" and resolves(
        out, qs["10"], root.joinpath("COCO_test2015_000000000001.jpg").name
    )


def test_okvqa(tmp_path: Path) -> None:
    root = images(tmp_path / "val2014", "COCO_val2014_000000297147.jpg")
    out = tmp_path / "ok.jsonl"
    run(
        "okvqa",
        FIX / "okvqa" / "OpenEnded_mscoco_val2014_questions.json",
        out,
        annotations=FIX / "okvqa" / "mscoco_val2014_annotations.json",
        image_root=root,
    )
    q = read(out)["2971476"]
    assert q.dataset == "okvqa" and len(q.answers) == 10 and q.answers[:3] == ["fern"] * 3


# ----------------------------------------------------------------------------- A-OKVQA


def test_aokvqa_direct_answer_and_multiple_choice(tmp_path: Path) -> None:
    root = images(tmp_path / "coco", "val2017/000000461751.jpg", "val2017/000000000040.jpg")
    src = FIX / "aokvqa" / "aokvqa_v1p0_val.json"
    out = tmp_path / "da.jsonl"
    s = run("aokvqa", src, out, image_root=root)
    qs = read(out)
    assert (s["written"], s["rejected"]) == (3, 3)
    q = qs["22jbM6gDxdaMaunuzgrsBB"]
    assert q.question == "What is in the motorcyclist's mouth?"
    assert q.answers == ["cigarette"] * 8 + ["cigar", "cigarette"]
    assert q.meta["choices"] == ["toothpick", "food", "popsicle stick", "cigarette"]
    assert q.meta["correct_choice_idx"] == 3 and len(q.meta["rationales"]) == 3
    assert (q.split, "setting" in q.meta) == ("val", False)
    assert qs["2t3CvbUhhHs9GzSFnYqGUw"].meta["difficult_direct_answer"] is True
    assert resolves(out, q, "000000461751.jpg")
    bad = rejects(out)
    assert bad["3Xz9aE1ZcZdcr4SYuvRyH6"] == "missing field 'choices'"
    assert "000000123456.jpg" in bad["4K2aXz4ADbE6aNdCiL3zQo"]
    assert bad["22jbM6gDxdaMaunuzgrsBB"] == "duplicate id '22jbM6gDxdaMaunuzgrsBB'"

    mc = tmp_path / "mc.jsonl"
    run("aokvqa", src, mc, image_root=root, setting="mc")
    q = read(mc)["22jbM6gDxdaMaunuzgrsBB"]
    assert q.question == (
        "What is in the motorcyclist's mouth?\nA. toothpick\nB. food\nC. popsicle stick\n"
        "D. cigarette"
    )
    assert q.answers == ["cigarette"] and q.meta["setting"] == "mc"
    assert q.meta["direct_answers"][0] == "cigarette"


def test_aokvqa_test_split(tmp_path: Path) -> None:
    root = images(tmp_path / "coco", "test2017/000000000007.jpg")
    out = tmp_path / "t.jsonl"
    run("aokvqa", FIX / "aokvqa" / "aokvqa_v1p0_test.json", out, image_root=root)
    (q,) = read(out).values()
    assert q.answers == [] and q.meta["choices"] == ["swim", "eat", "sleep", "run"]
    assert q.split == "test"


# ----------------------------------------------------------------------------- TallyQA


def test_tallyqa(tmp_path: Path) -> None:
    root = images(
        tmp_path / "tally",
        "VG_100K_2/2410408.jpg",
        "val2014/COCO_val2014_000000000042.jpg",
        "VG_100K/10.jpg",
    )
    out = tmp_path / "tally.jsonl"
    s = run("tallyqa", FIX / "tallyqa" / "test.json", out, image_root=root)
    qs = read(out)
    assert list(qs) == ["30095774", "900001", "900002"]
    assert s["rejected"] == 4
    assert [q.answers for q in qs.values()] == [["4"], ["2"], ["0"]]
    assert qs["30095774"].meta == {
        "image_id": 92410408,
        "issimple": False,
        "data_source": "imported_genome",
        "qtype": "complex",
    }
    assert qs["900001"].meta["qtype"] == "simple" and qs["900001"].split == "test"
    assert resolves(out, qs["30095774"], "2410408.jpg")
    bad = rejects(out)
    assert bad["900003"] == "'answer' must be an integer, got 'two' (a count)"
    assert bad["900004"] == "missing field 'answer'"
    assert "VG_100K/404.jpg" in bad["900005"]
    assert bad["900001"] == "duplicate id '900001'"


# ----------------------------------------------------------------------------- POPE


def test_pope(tmp_path: Path) -> None:
    root = images(
        tmp_path / "val2014",
        "COCO_val2014_000000310196.jpg",
        "COCO_val2014_000000210789.jpg",
    )
    out = tmp_path / "pope.jsonl"
    s = run("pope", FIX / "pope" / "coco_pope_adversarial.json", out, image_root=root)
    qs = read(out)
    assert list(qs) == ["1", "2", "3", "4", "5", "6"]
    assert (s["written"], s["rejected"]) == (6, 5)
    q = qs["2"]
    assert (q.question, q.answers) == ("Is there a car in the image?", ["no"])
    assert q.meta == {"setting": "adversarial"} and q.dataset == "pope"
    bad = rejects(out)
    assert "COCO_val2014_000000999999.jpg" in bad["7"]
    assert bad["8"] == "missing field 'text'"
    assert bad["9"] == "label must be yes or no, got 'maybe'"
    assert bad["3"] == "duplicate id '3'"
    assert bad[None].startswith("malformed JSON")


# ----------------------------------------------------------------------------- NLVR2


def test_nlvr2_two_images(tmp_path: Path) -> None:
    root = images(
        tmp_path / "nlvr2" / "dev",
        "dev-850-0-img0.png",
        "dev-850-0-img1.png",
        "dev-850-2-img0.png",
        "dev-850-2-img1.png",
        "dev-851-3-img0.png",  # its right image is missing
    )
    out = tmp_path / "nlvr2.jsonl"
    # The root of the download: dev/ is found from the identifier's split.
    s = run("nlvr2", FIX / "nlvr2" / "dev.json", out, image_root=root.parent)
    qs = read(out)
    assert list(qs) == ["dev-850-0-0", "dev-850-2-0", "dev-850-0-1", "dev-850-2-1"]
    assert s["rejected"] == 4
    q = qs["dev-850-2-0"]
    assert q.question == (
        "Is this statement about the left and right images true? The right image shows a "
        "curving walkway of dark glass circles embedded in dirt and flanked by foliage."
    )
    assert q.answers == ["yes"] and qs["dev-850-0-0"].answers == ["no"]
    assert (q.dataset, q.split) == ("nlvr2", "dev")
    left, right = q.meta["images"]
    assert q.image == left
    assert (out.parent / left).resolve().name == "dev-850-2-img0.png"
    assert (out.parent / right).resolve().name == "dev-850-2-img1.png"
    assert q.meta["label"] == "True" and q.meta["synset"] == "beer bottle"
    assert q.meta["sentence"].startswith("The right image shows")
    bad = rejects(out)
    assert "dev-851-3-img1.png" in bad["dev-851-3-0"]
    assert bad["dev-850-2-2"] == "missing field 'sentence'"
    assert bad["dev-850-0-0"] == "duplicate id 'dev-850-0-0'"
    assert bad["dev-850-0-3"] == "label must be True or False, got 'maybe'"


def test_nlvr2_train_directories(tmp_path: Path) -> None:
    root = images(tmp_path / "train", "17/train-10171-0-img0.png", "17/train-10171-0-img1.png")
    row = {"sentence": "A dog.", "label": "True", "identifier": "train-10171-0-0", "directory": 17}
    src = tmp_path / "train.json"
    src.write_text(json.dumps(row) + "\n")
    out = tmp_path / "t.jsonl"
    assert run("nlvr2", src, out, image_root=root)["written"] == 1
    assert read(out)["train-10171-0-0"].meta["directory"] == 17


# ----------------------------------------------------------------------------- contract


def test_resume_and_force(tmp_path: Path) -> None:
    root = images(tmp_path / "img", "n161313.jpg", "n15740.jpg")
    src = FIX / "gqa" / "testdev_balanced_questions.json"
    out = tmp_path / "q.jsonl"
    run("gqa", src, out, image_root=root)
    before = out.read_bytes()
    again = run("gqa", src, out, image_root=root)
    assert (again["written"], again["already_done"]) == (0, 4)
    assert out.read_bytes() == before
    # Killed half-way: the missing records are written, nothing twice.
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    s = run("gqa", src, out, image_root=root)
    assert (s["written"], s["already_done"]) == (2, 2)
    assert out.read_bytes() == before
    with pytest.raises(VpdError, match="different config"):
        run("gqa", src, out, image_root=root, split="val")
    assert run("gqa", src, out, image_root=root, split="val", force=True)["written"] == 4


def test_option_checks() -> None:
    with pytest.raises(ValueError, match="annotations is for --format vqav2 or okvqa"):
        ImportConfig(input="a", out="b", fmt="gqa", annotations="x.json")
    with pytest.raises(ValueError, match="setting"):
        ImportConfig(input="a", out="b", fmt="gqa", setting="mc")
    with pytest.raises(ValueError, match="question_field: field mapping"):
        ImportConfig(input="a", out="b", fmt="pope", question_field="text")


def test_wrong_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VpdError, match="not a VQA questions file"):
        run("vqav2", FIX / "gqa" / "testdev_balanced_questions.json", tmp_path / "o.jsonl")
    with pytest.raises(VpdError, match="JSON object keyed by question id"):
        run("gqa", FIX / "aokvqa" / "aokvqa_v1p0_val.json", tmp_path / "o.jsonl")
    with pytest.raises(VpdError, match="JSON list"):
        run("aokvqa", FIX / "gqa" / "testdev_balanced_questions.json", tmp_path / "o.jsonl")


def test_cli_import_official(tmp_path: Path) -> None:
    root = images(tmp_path / "coco" / "val2014", "COCO_val2014_000000297147.jpg")
    out = tmp_path / "ok.jsonl"
    args = [
        "data", "import", str(FIX / "okvqa" / "OpenEnded_mscoco_val2014_questions.json"),
        "--format", "okvqa",
        "--annotations", str(FIX / "okvqa" / "mscoco_val2014_annotations.json"),
        "--image-root", str(root.parent), "--out", str(out), "--no-progress",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(read(out)) == 2
    args[4] = "gqa"
    code, err = main_vpd(*args)
    assert code == 2 and err.startswith("error: annotations is for --format vqav2 or okvqa")
    res = CliRunner().invoke(app, ["data", "import", "--help"])
    assert "--format" in res.output and "aokvqa" in res.output and "--annotations" in res.output


def test_copied_fixture_with_default_image_root(tmp_path: Path) -> None:
    # Without --image-root the images are looked up beside the input file.
    src = tmp_path / "dl" / "coco_pope_random.json"
    src.parent.mkdir()
    shutil.copy(FIX / "pope" / "coco_pope_adversarial.json", src)
    images(src.parent, "COCO_val2014_000000310196.jpg", "val2014/COCO_val2014_000000210789.jpg")
    out = tmp_path / "p.jsonl"
    assert run("pope", src, out)["written"] == 6
    assert read(out)["1"].meta["setting"] == "random"
