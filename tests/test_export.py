"""`vpd export`: SFT records as LLaMA-Factory, TRL and Hugging Face datasets, read back by
their consumers: `datasets` (both save_to_disk and parquet), TRL's own message preparation,
collator and SFTTrainer, and LLaMA-Factory's sharegpt rules as its docs and loader state them
(dataset_info.json entry, alternating roles, one <image> token per image, image paths under
the dataset_dir)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import check_summary, read_rejects
from vpd.cli import app
from vpd.errors import ConfigMismatch, VpdError
from vpd.export import ExportConfig, run_export
from vpd.rationalize import answer_record, rationale_record


@pytest.fixture()
def sft(tmp_path: Path) -> Path:
    """An SFT file as rationalize writes it (answer + rationale per question), plus a
    two-image record, a record whose image is missing and one that starts with the
    assistant."""
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    recs = []
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(run / "images" / f"{i}.png")
        q = f"How many circles are there? ({i})"
        recs.append(answer_record(f"q{i}", f"images/{i}.png", q, str(i)))
        recs.append(
            rationale_record(f"q{i}/rationale", f"images/{i}.png", q, f"So the answer is {i}.")
        )
    pair = answer_record("pair", "images/0.png", "Is the statement true?", "yes")
    pair.messages[0]["content"].insert(1, {"type": "image"})
    pair.images = ["images/0.png", "images/1.png"]  # an extra key: both images, in order
    recs.append(pair)
    recs.append(answer_record("lost", "images/missing.png", "What?", "x"))
    bad = answer_record("backwards", "images/0.png", "What?", "x")
    bad.messages.reverse()
    recs.append(bad)
    path = run / "sft.jsonl"
    path.write_text("".join(r.model_dump_json() + "\n" for r in recs))
    return path


def export(sft: Path, out: Path, fmt: str, **kw: object) -> dict:
    s = run_export(ExportConfig(sft=sft, out=out, fmt=fmt, progress=False, **kw))
    check_summary(run_export, s)
    return s


# ----------------------------------------------------------------------------- LLaMA-Factory


def check_llamafactory(dataset_dir: Path, name: str) -> list[dict]:
    """LLaMA-Factory's reading of a sharegpt dataset, from its data docs and loader."""
    import datasets

    info = json.loads((dataset_dir / "dataset_info.json").read_text())[name]
    assert info["formatting"] == "sharegpt"
    cols, tags = info["columns"], info["tags"]
    ds = datasets.load_dataset(
        "json", data_files=str(dataset_dir / info["file_name"]), split="train"
    )
    rows = list(ds)
    for row in rows:
        msgs = row[cols["messages"]]
        if msgs[0][tags["role_tag"]] == tags["system_tag"]:
            msgs = msgs[1:]
        roles = [m[tags["role_tag"]] for m in msgs]
        # odd turns user, even turns assistant, an even count
        assert roles == [tags["user_tag"], tags["assistant_tag"]] * (len(roles) // 2), roles
        text = "".join(m[tags["content_tag"]] for m in msgs)
        images = row[cols["images"]]
        assert text.count("<image>") == len(images)
        # media_dir defaults to dataset_dir; paths are joined to it
        assert all(os.path.isfile(os.path.join(dataset_dir, p)) for p in images), images
    return rows


def test_llamafactory(sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "LLaMA-Factory" / "data"
    out.mkdir(parents=True)
    other = {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}
    (out / "dataset_info.json").write_text(json.dumps(other))
    s = export(sft, out, "llamafactory", name="vpd_demo")
    assert (s["records"], s["per_task"], s["rejected"]) == (
        7,
        {"answer": 4, "rationale": 3},
        2,
    )
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["alpaca_en_demo"] == other["alpaca_en_demo"]  # other datasets kept
    assert info["vpd_demo"]["file_name"] == "vpd_demo.json"
    rows = {r["id"]: r for r in check_llamafactory(out, "vpd_demo")}
    assert rows["q1/answer"]["messages"] == [
        {
            "role": "user",
            "content": "<image>How many circles are there? (1)\n"
            "Answer the question using a single word or phrase.",
        },
        {"role": "assistant", "content": "1"},
    ]
    assert rows["q1/answer"]["images"] == [os.path.relpath(sft.parent / "images/1.png", out)]
    assert rows["pair/answer"]["messages"][0]["content"].startswith("<image><image>Is the")
    assert [Path(p).name for p in rows["pair/answer"]["images"]] == ["0.png", "1.png"]
    rejected = {r["id"]: r["reason"] for r in read_rejects(out / "vpd_demo")}
    assert rejected == {
        "lost/answer": "image not found: images/missing.png",
        "backwards/answer": "the conversation must end with an assistant turn",
    }


def test_llamafactory_copied_images_travel_with_the_folder(sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "lf"
    export(sft, out, "llamafactory", copy_images=True, tasks=["answer"])
    moved = tmp_path / "elsewhere" / "data"
    shutil.move(str(out), moved)
    shutil.rmtree(sft.parent / "images")
    rows = check_llamafactory(moved, "vpd_sft")
    assert len(rows) == 4 and {r["task"] for r in rows} == {"answer"}
    assert all(p.startswith("images/vpd_sft/") for r in rows for p in r["images"])
    assert len(list((moved / "images" / "vpd_sft").iterdir())) == 3  # each file once


# ----------------------------------------------------------------------------- TRL / HF


def test_trl_reads_back_with_datasets_and_trl(sft: Path, tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "trl"
    s = export(sft, out, "trl")
    assert s["records"] == 7 and s["rejected"] == 2
    assert (out / "rejects.jsonl").exists() and (out / "vpd_export.json").exists()
    from_parquet = datasets.load_dataset(str(out), split="train")
    from_disk = datasets.load_from_disk(str(out / "dataset"))
    for ds in (from_parquet, from_disk):
        assert ds.column_names == ["messages", "images"] and len(ds) == 7
    ex = from_parquet[0]
    assert ex["messages"][0]["content"][0]["type"] == "image"
    assert ex["messages"][1] == {"role": "assistant", "content": [{"type": "text", "text": "0"}]}
    assert isinstance(ex["images"][0], Image.Image) and ex["images"][0].size == (40, 30)
    pair = from_disk[6]
    assert len(pair["images"]) == 2 and pair["images"][1].getpixel((0, 0)) == (60, 90, 200)

    trl_data = pytest.importorskip("trl.data_utils")
    for ex in from_parquet:  # TRL's own check and image injection, as its collator runs it
        msgs = trl_data.prepare_multimodal_messages(ex["messages"], images=ex["images"])
        filled = [p["image"] for m in msgs for p in m["content"] if p["type"] == "image"]
        assert filled == ex["images"]


def test_hf_keeps_every_field(sft: Path, tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "hf"
    export(sft, out, "hf", tasks=["rationale"])
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.column_names == ["id", "task", "messages", "images", "meta"]
    assert ds["id"] == ["q0/rationale", "q1/rationale", "q2/rationale"]
    assert set(ds["task"]) == {"rationale"}
    assert json.loads(ds[0]["meta"]) == {}
    a = datasets.load_from_disk(str(out / "dataset"))
    assert a.features == ds.features and a["id"] == ds["id"]


@pytest.mark.slow
def test_trl_collator_and_sft_trainer_train_on_the_export(sft: Path, tmp_path: Path) -> None:
    """TRL's collator batches the export for a (tiny, random) LLaVA and SFTTrainer trains."""
    pytest.importorskip("trl")
    import datasets
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from vpd.tune.tiny import build_tiny_family

    out = tmp_path / "trl"
    export(sft, out, "trl")
    ds = datasets.load_dataset(str(out), split="train")
    init = build_tiny_family("llava", tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(init)
    batch = DataCollatorForVisionLanguageModeling(processor)([ds[0], ds[1], ds[6]])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_image = processor.num_additional_image_tokens + (32 // 8) ** 2
    assert batch["pixel_values"].shape[0] == 4  # 1 + 1 + 2 images
    assert [int((ids == image_id).sum()) for ids in batch["input_ids"]] == [
        per_image,
        per_image,
        2 * per_image,
    ]
    model = LlavaForConditionalGeneration.from_pretrained(init)
    assert torch.isfinite(model(**batch).loss)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft_out"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    result = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=processor
    ).train()
    assert result.global_step == 2 and result.training_loss > 0


# ----------------------------------------------------------------------------- contract


def test_rerun_skips_then_follows_the_sft_file(sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "trl"
    export(sft, out, "trl")
    assert export(sft, out, "trl")["skipped"] is True
    extra = answer_record("q9", "images/2.png", "And now?", "9")
    with open(sft, "a") as f:
        f.write(extra.model_dump_json() + "\n")
    s = export(sft, out, "trl")
    assert (s["skipped"], s["records"]) == (False, 8)
    with pytest.raises(ConfigMismatch, match="--force"):
        export(sft, out, "trl", tasks=["answer"])
    assert export(sft, out, "trl", tasks=["answer"], force=True)["records"] == 5
    # A staging folder left by a killed export is cleared, not mixed in.
    (tmp_path / ".trl2.partial" / "junk").mkdir(parents=True)
    assert export(sft, tmp_path / "trl2", "trl")["records"] == 8
    assert not (tmp_path / ".trl2.partial").exists()


def test_refuses_a_foreign_folder(sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(VpdError, match="not a vpd export"):
        export(sft, out, "hf")
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli(sft: Path, tmp_path: Path) -> None:
    out = tmp_path / "lf"
    args = ["export", str(sft), "--format", "llamafactory", "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--name", "vpd_cli"])
    assert res.exit_code == 0, res.output
    assert (out / "vpd_cli.json").exists()
    res = CliRunner().invoke(app, [*args[:3], "axolotl", *args[4:]])
    assert isinstance(res.exception, VpdError)
    assert str(res.exception).startswith("--format: Input should be 'llamafactory'")
    res = CliRunner().invoke(app, [*args, "--name", "../up"])
    # A config error is one line naming the flag.
    assert isinstance(res.exception, VpdError)
    assert str(res.exception).startswith("--name: String should match pattern")
    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    assert "llamafactory" in help_text and "Example" in help_text


def test_two_exports_in_same_named_folders_load_apart(sft: Path, tmp_path: Path) -> None:
    import datasets

    export(sft, tmp_path / "a" / "x", "hf", tasks=["answer"])
    export(sft, tmp_path / "b" / "x", "hf", tasks=["rationale"])
    a = datasets.load_dataset(str(tmp_path / "a" / "x"), split="train")
    b = datasets.load_dataset(str(tmp_path / "b" / "x"), split="train")
    assert set(a["task"]) == {"answer"} and set(b["task"]) == {"rationale"}
