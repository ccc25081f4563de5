"""vpd tune: data (label masks per family, mixing, screening), config, training, resume, merge.

Tiny random VLMs of each family are built from configs (vpd.tune.tiny); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tests.helpers import check_summary
from vpd.errors import ConfigMismatch, VpdError
from vpd.tune import load_tune_config, run_tune
from vpd.tune.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    group_turns,
    mix_tasks,
    parse_task_weights,
    prepare,
)
from vpd.tune.model import load_vlm
from vpd.tune.tiny import build_tiny_family

FAMILIES = ["llava", "idefics3", "paligemma", "qwen2_vl"]
ROOT = Path(__file__).resolve().parents[1]


def write_sft(folder: Path, n: int = 8, extra: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        im = Image.new("RGB", (48, 40), "white")
        ImageDraw.Draw(im).ellipse([4 + i, 4, 20 + i, 20], fill="red")
        im.save(folder / f"{i}.png")
        task = "answer" if i % 2 == 0 else "rationale"
        text = str(i % 3 + 1) if task == "answer" else f"I count the circles: {i % 3 + 1}."
        # Plain-string assistant content on some records: both shapes are accepted.
        content = text if i % 4 == 1 else [{"type": "text", "text": text}]
        lines.append(
            {
                "id": f"q{i}",
                # An answer and the next record's rationale are one question's (the
                # question layout groups them); the records layout ignores qid.
                "qid": f"q{i - i % 2}",
                "image": f"{i}.png",
                "task": task,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "How many?"}],
                    },
                    {"role": "assistant", "content": content},
                ],
            }
        )
    lines += extra or []
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = build_tiny_family(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return get


@pytest.fixture(scope="session")
def sft(tmp_path_factory) -> Path:
    return write_sft(tmp_path_factory.mktemp("sft"))


def _cfg(sft: Path, out: Path, init: Path, **kw):
    base = dict(sft=sft, out=out, init=str(init), max_steps=2, batch_size=2, progress=False)
    base.update(kw)
    return load_tune_config(**base)


# ----------------------------------------------------------------------------- data


def test_task_weights_parse_and_errors():
    assert parse_task_weights("answer=1, rationale=0.5") == {"answer": 1.0, "rationale": 0.5}
    assert parse_task_weights(None) == {}
    for bad in ("answer", "foo=1", "answer=x", "answer=-1"):
        with pytest.raises(VpdError):
            parse_task_weights(bad)


def test_mix_tasks_repeats_and_subsamples_deterministically():
    exs = [Example(f"a{i}", "answer", Path("x"), []) for i in range(10)]
    exs += [Example(f"r{i}", "rationale", Path("x"), []) for i in range(10)]
    mixed = mix_tasks(exs, {"answer": 2.5, "rationale": 0.3}, seed=1)
    tasks = [e.task for e in mixed]
    assert tasks.count("answer") == 25 and tasks.count("rationale") == 3
    assert [e.id for e in mix_tasks(exs, {"answer": 2.5, "rationale": 0.3}, seed=1)] == [
        e.id for e in mixed
    ]
    assert mix_tasks(exs, {"rationale": 0}, seed=1) == exs[:10]


def _qa(qid: str, image: str, question: str, answer: str, task: str = "answer") -> dict:
    user = [{"type": "image"}, {"type": "text", "text": question}]
    return {"id": qid, "image": image, "task": task, "messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}  # fmt: skip


def test_turns_per_image_joins_each_images_answers_into_labelled_turns(tiny_dir, tmp_path):
    from vpd.tune.model import load_processor

    folder = tmp_path / "mt"
    write_sft(folder, n=2)  # draws 0.png and 1.png
    recs = [
        _qa("a0", "0.png", "What color is the circle?", "red"),
        _qa("b0", "1.png", "How many circles?", "7"),
        _qa("a1", "0.png", "Is there a star?", "no"),
        _qa("r0", "0.png", "How many circles?", "I count them: 1.", task="rationale"),
        _qa("a2", "0.png", "What shape is it?", "circle"),
    ]
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    proc = load_processor(tiny_dir("llava"))
    single, _ = prepare(path, proc, progress=False, layout="records")
    assert [e.id for e in single.examples] == ["a0", "b0", "a1", "r0", "a2"]
    ds, stats = prepare(path, proc, progress=False, layout="records", turns_per_image=2)
    assert stats.records == 5
    # Image 0's answers in file order, two per conversation, where its first question was;
    # the rationale and the other image's answer pass through.
    assert [e.id for e in ds.examples] == ["a0+1", "a2", "b0", "r0"]
    conv = ds.examples[0]
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    tok = proc.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    feats = ds[0]
    ids, labels = feats["input_ids"], feats["labels"]
    # The image's tokens once (the first turn's), and exactly the two answers labelled.
    assert int((ids == image_id).sum()) == int((single[0]["input_ids"] == image_id).sum())
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    spans: list[list[int]] = []  # runs of consecutive labelled positions
    for j in labelled:
        if spans and j == spans[-1][-1] + 1:
            spans[-1].append(j)
        else:
            spans.append([j])
    texts = [tok.decode(ids[sp[0] : sp[-1] + 1]).strip() for sp in spans]
    assert len(texts) == 2 and texts[0].startswith("red") and texts[1].startswith("no")
    prompt = tok.decode(ids[: spans[1][0]])
    assert prompt.index("What color") < prompt.index("red") < prompt.index("Is there a star")
    assert group_turns(single.examples, 1) == single.examples


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_assistant_tokens(family, tiny_dir, sft):
    from vpd.tune.model import load_processor

    path = tiny_dir(family)
    proc = load_processor(path)
    mtype = json.loads((path / "config.json").read_text())["model_type"]
    ds, stats = prepare(
        sft, proc, max_length=512, model_type=mtype, progress=False, layout="records"
    )
    assert stats.records == 8 and stats.dropped_too_long == 0
    tok = proc.tokenizer
    image_ids = {
        tok.convert_tokens_to_ids(t)
        for t in ("<image>", "<|image_pad|>", "<fake_token_around_image>", "<global-img>")
        if t in tok.get_vocab()
    }
    for i in range(len(ds)):
        ex = ds.examples[i]
        feats = ds[i]
        ids, labels = feats["input_ids"], feats["labels"]
        answer = next(m for m in ex.messages if m["role"] == "assistant")["content"][0]["text"]
        # Token by token: a position is labelled iff it lies in one contiguous assistant span,
        # where the label equals the input token.
        labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(labelled[0], labelled[-1] + 1))
        assert all(int(labels[j]) == int(ids[j]) for j in labelled)
        assert not any(int(ids[j]) in image_ids for j in labelled)
        # The span is the answer (plus the template's end-of-turn marker), nothing of the prompt.
        span = tok.decode(ids[labelled[0] : labelled[-1] + 1])
        assert span.strip().startswith(answer), (family, span)
        assert "How many?" not in span
        prompt = tok.decode(ids[: labelled[0]])
        assert "How many?" in prompt and answer not in prompt.split("How many?")[-1]
        # Image tokens are really there (the processor expanded them) and never labelled.
        assert any(int(t) in image_ids for t in ids[: labelled[0]])
    batch = Collator(tok.pad_token_id)([ds[0], ds[1], ds[2]])
    lens = [len(ds[j]["input_ids"]) for j in range(3)]
    for j, n in enumerate(lens):
        assert (batch["labels"][j, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][j, n:] == 0).all()
    if family == "paligemma":  # the answer is the causal suffix, the prompt the prefix
        tt = ds[0]["token_type_ids"]
        first = int((ds[0]["labels"] != IGNORE_INDEX).nonzero()[0])
        assert tt[:first].sum() == 0 and bool((tt[first:] == 1).all())


def test_screening_rejects_bad_records_and_counts_long_ones(tmp_path, tiny_dir):
    from vpd.store import RejectWriter
    from vpd.tune.model import load_processor

    good_user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}
    long_answer = {"role": "assistant", "content": "word " * 400}
    extra = [
        {
            "id": "noimg",
            "image": "missing.png",
            "task": "answer",
            "messages": [good_user, {"role": "assistant", "content": "1"}],
        },
        {"id": "noans", "image": "0.png", "task": "answer", "messages": [good_user, good_user]},
        {"id": "long", "image": "0.png", "task": "rationale", "messages": [good_user, long_answer]},
        {
            "id": "badtask",
            "image": "0.png",
            "task": "caption",
            "messages": [good_user, long_answer],
        },
    ]
    path = write_sft(tmp_path / "d", n=4, extra=extra)
    with open(path, "a") as f:
        f.write("{not json\n")
    proc = load_processor(tiny_dir("llava"))
    rej_path = tmp_path / "rej.jsonl"
    with RejectWriter(rej_path) as rej:
        ds, stats = prepare(
            path, proc, max_length=128, rejects=rej, progress=False, layout="records"
        )
    assert len(ds) == 4 and stats.dropped_too_long == 1 and stats.rejected == 4
    reasons = {
        json.loads(x).get("id"): json.loads(x)["reason"] for x in rej_path.read_text().splitlines()
    }
    assert "image not found" in reasons["noimg"]
    assert "no assistant" in reasons["noans"]
    assert "max_length" in reasons["long"]
    assert "task" in reasons["badtask"]
    # truncate keeps the long one, cut to max_length, still ending in labelled answer tokens
    ds2, stats2 = prepare(
        path, proc, max_length=128, truncation="truncate", progress=False, layout="records"
    )
    assert len(ds2) == 5 and stats2.truncated == 1
    item = next(ds2[i] for i in range(len(ds2)) if ds2.examples[i].id == "long")
    assert len(item["input_ids"]) == 128 and item["labels"][-1] != IGNORE_INDEX


# ----------------------------------------------------------------------------- config / CLI


def test_recipe_set_and_flags_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tune:\n  lr: 0.001\n  batch_size: 4\n  epochs: 3\n  freeze: vision\n")
    cfg = load_tune_config(
        recipe, ["lr=2e-4", "task_weights=answer=1,rationale=2"], sft="s", out="o", epochs=1.5
    )
    assert cfg.lr == 2e-4 and cfg.batch_size == 4 and cfg.epochs == 1.5
    assert cfg.freeze == ["vision"] and cfg.task_weights == {"answer": 1.0, "rationale": 2.0}
    with pytest.raises(VpdError, match="lr"):
        load_tune_config(None, ["lr=-1"], sft="s", out="o")
    with pytest.raises(VpdError, match="unknown part"):
        load_tune_config(None, None, sft="s", out="o", freeze="eyes")


def test_shipped_recipes_load():
    for name in ("tune-cpu.yaml", "tune-gpu.yaml"):
        cfg = load_tune_config(ROOT / "recipes" / name, sft="s", out="o")
        assert cfg.lora
    for ds in ("zero2", "zero3", "zero3_offload"):
        json.loads((ROOT / "recipes" / f"ds_{ds}.json").read_text())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["missing.jsonl", "--out", "o"], "SFT file not found"),
        (["{sft}", "--out", "o", "--deepspeed", "zero9"], "--deepspeed zero9"),
        (["{sft}", "--out", "o", "--truncation", "chop"], "truncation"),
    ],
)
def test_cli_errors_are_one_line(args, needle, sft, tmp_path):
    args = [a.replace("{sft}", str(sft)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "vpd.cli", "tune", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_then_generate(family, tiny_dir, sft, tmp_path):
    out = tmp_path / "out"
    s = run_tune(_cfg(sft, out, tiny_dir(family), lr=1e-3))
    check_summary(run_tune, s)
    assert s["steps"] == 2 and s["method"] == "lora" and not s["skipped"]
    rows = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (out / "loss.png").stat().st_size > 0
    # final/ is a standalone model: no adapter files, loads with the generic loader.
    assert not (out / "final" / "adapter_config.json").exists()
    model, proc = load_vlm(out / "final")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[[Image.new("RGB", (40, 40), "red")]], return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_lora_merge_matches_adapter_and_changes_weights(tiny_dir, sft, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    init = tiny_dir("llava")
    out = tmp_path / "out"
    run_tune(_cfg(sft, out, init, lr=5e-3))
    ds, _ = prepare(sft, load_vlm(out / "final")[1], progress=False, layout="records")
    batch = Collator(0)([ds[0]])
    batch.pop("labels")
    merged = AutoModelForImageTextToText.from_pretrained(out / "final").eval()
    base = AutoModelForImageTextToText.from_pretrained(init).eval()
    with torch.no_grad():
        m_logits = merged(**batch).logits
        b_logits = base(**batch).logits
        a_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(**batch).logits
    assert torch.allclose(m_logits, a_logits, atol=1e-4)
    assert not torch.allclose(m_logits, b_logits, atol=1e-4)


def _losses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]


def _kill_after_checkpoint_and_resume(cfg, out: Path, last: int) -> tuple[dict, list[dict]]:
    """Remove what a kill right after the checkpoint before ``last`` would not have written
    (the last checkpoint, the outputs, the summary; the loss log keeps its later steps), run
    the same config again; return its summary and the loss log."""
    for p in (f"checkpoint-{last}", "final", "adapter"):
        shutil.rmtree(out / p)
    (out / "summary.json").unlink()
    return run_tune(cfg), _losses(out)


def _assert_same_losses(full: list[dict], again: list[dict]) -> None:
    for a, b in zip(full, again, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * max(1.0, abs(a["loss"])), (a, b)


def test_resume_continues_the_same_loss_curve(tiny_dir, sft, tmp_path):
    init = tiny_dir("llava")
    out = tmp_path / "out"
    cfg = _cfg(sft, out, init, max_steps=4, save_steps=2, lr=1e-3)
    run_tune(cfg)
    full = _losses(out)
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    # Finished: the same command does nothing.
    assert run_tune(cfg)["skipped"] is True
    # Simulate a kill right after checkpoint-2: later state gone, loss log holds steps past it.
    s, again = _kill_after_checkpoint_and_resume(cfg, out, last=4)
    assert s["resumed_from_step"] == 2 and s["steps"] == 4
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    _assert_same_losses(full, again)
    # Other options on the same folder: refused, unless --force (old run kept as .bak).
    with pytest.raises(ConfigMismatch):
        run_tune(cfg.model_copy(update={"lr": 2e-3}))
    s = run_tune(cfg.model_copy(update={"lr": 2e-3, "force": True, "max_steps": 1}))
    assert s["steps"] == 1 and list(tmp_path.glob("out.*.bak"))


@pytest.mark.parametrize("family", ["llava", "idefics3", "paligemma"])
def test_sparse_logits_give_the_models_own_loss_and_gradients(family, tiny_dir, sft, tmp_path):
    """`vpd tune` projects onto the vocabulary only where a label is: same loss, same
    gradients as the model's own loss over every position."""
    from transformers import AutoModelForImageTextToText, Trainer, TrainingArguments

    from vpd.tune.model import load_processor
    from vpd.tune.train import processor_pad_id, sparse_logits_trainer

    init = tiny_dir(family)
    proc = load_processor(init)
    proc.tokenizer.padding_side = "right"
    ds, _ = prepare(sft, proc, progress=False, layout="records", model_type=family)
    batch = Collator(processor_pad_id(proc))([ds[i] for i in range(4)])
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    got = {}
    for name, cls in (("own", Trainer), ("sparse", sparse_logits_trainer(Trainer))):
        model = AutoModelForImageTextToText.from_pretrained(init)
        loss = cls(model=model, args=args).compute_loss(model, dict(batch), num_items_in_batch=n)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        got[name] = (float(loss), grads)
    assert got["own"][0] == pytest.approx(got["sparse"][0], rel=1e-5)
    assert torch.allclose(got["own"][1], got["sparse"][1], atol=1e-6)


def test_length_grouped_batches_use_screening_lengths_and_replay_each_epoch(tiny_dir, tmp_path):
    """Batches hold examples of similar length (less padding), every example once per
    epoch, the lengths come from screening (no second encoding pass), and an epoch's order
    depends only on seed and epoch, so a resumed run sees the same batches."""
    from transformers import Trainer, TrainingArguments

    from vpd.tune.model import load_processor
    from vpd.tune.train import length_grouped_trainer

    long = [
        {
            "id": f"long{i}",
            "image": f"{i}.png",
            "task": "rationale",
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How?"}]},
                {"role": "assistant", "content": "I look. " * (10 + i)},
            ],
        }
        for i in range(32)
    ]
    path = write_sft(tmp_path / "d", n=32, extra=long)
    proc = load_processor(tiny_dir("llava"))
    ds, _ = prepare(path, proc, progress=False, layout="records")
    assert ds.lengths == [len(ds[i]["input_ids"]) for i in range(len(ds))]

    def epoch(trainer, e):
        sampler = trainer._get_train_sampler()
        sampler.set_epoch(e)
        return list(sampler)

    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        seed=3,
    )
    trainer = length_grouped_trainer(Trainer)(
        model=torch.nn.Linear(1, 1), args=args, train_dataset=ds
    )
    order = epoch(trainer, 0)
    assert sorted(order) == list(range(len(ds)))

    def padding(order):
        batches = [[ds.lengths[i] for i in order[b : b + 4]] for b in range(0, len(order), 4)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    # 32 short and 32 long examples: far less padding than in a random order.
    shuffled = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order) < padding(shuffled) / 2, (padding(order), padding(shuffled))
    fresh = length_grouped_trainer(Trainer)(
        model=torch.nn.Linear(1, 1), args=args, train_dataset=ds
    )
    assert epoch(fresh, 0) == order and epoch(fresh, 1) == epoch(trainer, 1)
    assert epoch(trainer, 1) != order


def test_resume_in_a_later_epoch_replays_that_epochs_batches(tiny_dir, sft, tmp_path):
    init = tiny_dir("llava")
    out = tmp_path / "out"
    # 8 examples, batch 2: 4 steps an epoch; a kill after checkpoint-6 resumes in epoch 2.
    cfg = _cfg(sft, out, init, max_steps=8, save_steps=2, lr=1e-3)
    run_tune(cfg)
    full = _losses(out)
    s, again = _kill_after_checkpoint_and_resume(cfg, out, last=8)
    assert s["resumed_from_step"] == 6 and s["steps"] == 8
    _assert_same_losses(full, again)
