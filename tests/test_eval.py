"""`vpd eval`: predictions, scoring, per-type report, baseline, resume, batching, errors.

The VLM is a tiny LLaVA built from a config (random weights, a word-level tokenizer, a
chat template), saved in Hugging Face format: no download, a second to build.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import read_jsonl, read_rejects, run_vpd, write_jsonl
from vpd.errors import ConfigMismatch, VpdError
from vpd.evaluate import (
    EvalConfig,
    answer_from_rationale,
    build_report,
    clean_answer,
    majority_answers,
    majority_baseline,
    qtype_of,
    run_eval,
)
from vpd.metrics import score_answer
from vpd.records import Question

# "yes" first: a model whose logits are all equal picks id 0, i.e. always answers "yes".
WORDS = (
    "yes no <pad> <s> </s> <unk> <image> USER : ASSISTANT 0 1 2 3 4 5 ? . , a above any are "
    "below big blue circle circles color contain does greater green how image in is large left "
    "less many more number object objects of orange purple red right shape shapes small square "
    "squares star stars than the there to triangle triangles what yellow answer question using "
    "single word or phrase explain rationale so"
).split()
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT : {% for c in m['content'] %}{{ c['text'] }}{% endfor %} </s> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tiny_llava(
    out: Path,
    always_yes: bool = False,
    seed: int = 0,
    chat_template: bool = True,
    script: tuple[str, ...] = (),
) -> Path:
    """Save a tiny random LLaVA (CLIP tower + Llama LM) and its processor to ``out``.

    ``script``: set weights instead, so that whatever it is asked the model says these
    words (then ``</s>``) after the prompt's last token ``:``. Attention and MLP outputs
    are zero, so each position's hidden state is its own token's one-hot embedding, and
    the LM head maps each word of the chain to the next.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token the "default" strategy drops
        chat_template=TEMPLATE if chat_template else None,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=128 if script else 32,  # one-hot embeddings need hidden >= vocab
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ),
        image_token_id=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if always_yes:
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()  # all logits 0 -> argmax id 0
    if script:
        lm = model.model.language_model
        chain = [vocab[w] for w in (":", *script, "</s>")]
        assert len(set(chain)) == len(chain), "each word once: the next word is a function"
        with torch.no_grad():
            for layer in lm.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            lm.embed_tokens.weight.zero_()
            lm.embed_tokens.weight[:, : len(WORDS)] = torch.eye(len(WORDS))
            model.lm_head.weight.zero_()
            for word, nxt in itertools.pairwise(chain):
                model.lm_head.weight[nxt, word] = 1.0
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def yes_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("yes-llava"), always_yes=True)


def _cfg(model: Path, synth_dir: Path, out: Path, **kw) -> EvalConfig:
    kw.setdefault("progress", False)
    return EvalConfig(model=str(model), questions=synth_dir / "test.jsonl", out=out, **kw)


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("yes", "yes"),
        ("  Yes.\nBecause there is a red circle.", "Yes"),
        ("So the answer is 3.", "3"),
        ("The answer is: blue!", "blue"),
        ("Answer: red circle", "red circle"),
        ("\n\n 2.5 \n", "2.5"),
        ('"green"', "green"),
        ("", ""),
    ],
)
def test_clean_answer(raw: str, want: str) -> None:
    assert clean_answer(raw) == want


def test_answer_from_rationale() -> None:
    text = "There are 2 red circles. The answer is not obvious. So the answer is 2.5. Done"
    assert answer_from_rationale(text) == "2.5"
    assert answer_from_rationale("I see a blue star.\nSo the answer is blue star.") == "blue star"
    assert answer_from_rationale("no conclusion here") is None


def test_qtype_of() -> None:
    assert qtype_of(Question(id="a", image="x", question="?", meta={"qtype": "count"})) == "count"
    assert qtype_of(Question(id="a", image="x", question="?", meta={"type": "rel"})) == "rel"
    assert qtype_of(Question(id="a", image="x", question="?")) == "all"


def _q(qid: str, qtype: str | None, answers: list[str]) -> Question:
    meta = {"qtype": qtype} if qtype else {}
    return Question(id=qid, image="x.png", question="?", answers=answers, meta=meta)


def test_majority_baseline_arithmetic() -> None:
    train = [
        _q("t1", "count", ["2"]),
        _q("t2", "count", ["2"]),
        _q("t3", "count", ["3"]),
        _q("t4", "color", ["Red", "red", "blue"]),  # one vote: its own majority, normalized
        _q("t5", "color", ["blue"]),
        _q("t6", "color", ["red"]),
        _q("t7", "exists", ["no"]),
        _q("t8", "exists", []),  # unlabelled: no vote
    ]
    best, overall = majority_answers(train)
    assert best == {"count": "2", "color": "red", "exists": "no"}
    assert overall in ("2", "red")  # 3 votes each; the first seen wins ties
    assert overall == "2"
    test = [
        _q("e1", "count", ["2"]),  # 1
        _q("e2", "count", ["two"]),  # 1 (count metric: "2" == "two")
        _q("e3", "count", ["4"]),  # 0
        _q("e4", "color", ["red"]),  # 1
        _q("e5", "exists", ["yes"]),  # 0
        _q("e6", "shape", ["2"]),  # unseen type -> overall answer "2": 1
        _q("e7", "count", []),  # unlabelled: not scored
    ]
    b = majority_baseline(train, test)
    assert b["n"] == 6 and b["train_questions"] == 8
    assert b["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert b["per_type"]["count"] == {
        "accuracy": pytest.approx(2 / 3, abs=1e-6),
        "n": 3,
        "answer": "2",
    }
    assert b["per_type"]["exists"]["accuracy"] == 0.0
    assert b["per_type"]["shape"]["answer"] == "2" and b["per_type"]["shape"]["accuracy"] == 1.0


def test_build_report_per_type() -> None:
    preds = [
        {"id": "a", "qtype": "count", "score": 1.0},
        {"id": "b", "qtype": "count", "score": 0.0},
        {"id": "c", "qtype": "color", "score": 0.6},
        {"id": "d", "score": 1.0},  # no qtype -> "all"
    ]
    rep = build_report(preds, None, {"x": 1})
    assert rep["n"] == 4 and rep["x"] == 1
    assert rep["accuracy"] == pytest.approx(2.6 / 4)
    assert rep["per_type"]["count"] == {"accuracy": 0.5, "n": 2, "correct": 1.0}
    assert rep["per_type"]["color"]["accuracy"] == pytest.approx(0.6)
    assert rep["per_type"]["all"]["n"] == 1
    assert "majority_baseline" not in rep


# ----------------------------------------------------------------------------- end to end


def test_eval_writes_predictions_and_report(tiny_vlm: Path, synth_dir: Path, tmp_path: Path):
    out = tmp_path / "preds.jsonl"
    rep = run_eval(
        _cfg(tiny_vlm, synth_dir, out, train_questions=synth_dir / "train.jsonl", batch_size=4)
    )
    qs = read_jsonl(synth_dir / "test.jsonl", Question)
    preds = read_jsonl(out)
    assert [p["id"] for p in preds] == [q.id for q in qs]  # file order, one each
    by_id = {q.id: q for q in qs}
    for p in preds:
        q = by_id[p["id"]]
        assert p["qid"] == q.id and p["qtype"] == q.meta["qtype"]
        assert p["prediction"] == clean_answer(p["raw"])
        assert p["score"] == score_answer(p["prediction"], q)
        assert "rationale" not in p
    assert rep["questions"] == rep["predicted"] == rep["new"] == len(qs)
    assert rep["already_done"] == 0 and rep["missing"] == 0 and rep["rejected"] == 0
    assert set(rep["per_type"]) == {q.meta["qtype"] for q in qs}
    assert sum(t["n"] for t in rep["per_type"].values()) == len(qs)
    assert rep["examples_per_s"] > 0 and rep["wall_s"] > 0
    base = rep["majority_baseline"]
    assert base["n"] == len(qs) and set(base["per_type"]) == set(rep["per_type"])
    train = read_jsonl(synth_dir / "train.jsonl", Question)
    assert base == {**majority_baseline(train, qs), "train_rejected": 0}
    assert json.loads(Path(f"{out}.report.json").read_text()) == rep
    meta = json.loads(Path(f"{out}.meta.json").read_text())["config"]
    assert meta["prompt"] == "Answer the question using a single word or phrase."
    assert meta["max_new_tokens"] == 16 and "batch_size" not in meta


def test_always_yes_model_accuracy_is_exact(yes_vlm: Path, synth_dir: Path, tmp_path: Path):
    """A model that can only say "yes" scores exactly the yes-gold share, per type too."""
    out = tmp_path / "yes.jsonl"
    rep = run_eval(_cfg(yes_vlm, synth_dir, out, max_new_tokens=1, batch_size=3))
    qs = read_jsonl(synth_dir / "test.jsonl", Question)
    assert {p["prediction"] for p in read_jsonl(out)} == {"yes"}
    want = [score_answer("yes", q) for q in qs]
    assert any(want) and not all(want)  # the set has yes and non-yes gold answers
    assert rep["accuracy"] == pytest.approx(sum(want) / len(want), abs=1e-6)
    for t, r in rep["per_type"].items():
        ws = [score_answer("yes", q) for q in qs if q.meta["qtype"] == t]
        assert r["accuracy"] == pytest.approx(sum(ws) / len(ws), abs=1e-6)


def test_rationale_is_generated_and_stored(yes_vlm: Path, synth_dir: Path, tmp_path: Path):
    out = tmp_path / "rat.jsonl"
    rep = run_eval(
        _cfg(yes_vlm, synth_dir, out, limit=2, rationale=True, rationale_max_new_tokens=4)
    )
    preds = read_jsonl(out)
    assert len(preds) == 2
    for p in preds:
        assert p["rationale"] == "yes yes yes yes"
        assert p["rationale_answer"] is None and p["rationale_score"] == 0.0
    assert rep["rationale_accuracy"] == 0.0
    meta = json.loads(Path(f"{out}.meta.json").read_text())["config"]
    assert meta["rationale_prompt"] == "Explain the rationale to answer the question."


SAYS_TWO = ("so", "the", "answer", "is", "2", ".")


@pytest.fixture(scope="module")
def says_two_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA whose every reply is "so the answer is 2 ." (set weights)."""
    return build_tiny_llava(tmp_path_factory.mktemp("two-llava"), script=SAYS_TWO)


def _count_questions(synth_dir: Path, out: Path) -> Path:
    """Two count questions on a synthetic image: gold "two" (the model is right: the count
    metric reads "two" as 2) and gold "3" (wrong)."""
    image = str(synth_dir / read_jsonl(synth_dir / "test.jsonl")[0]["image"])
    q = {"image": image, "question": "How many circles are there?", "meta": {"qtype": "count"}}
    return write_jsonl(
        out, [{**q, "id": "right", "answers": ["two"]}, {**q, "id": "wrong", "answers": ["3"]}]
    )


def test_rationale_is_parsed_and_scored_right_and_wrong(
    says_two_vlm: Path, synth_dir: Path, tmp_path: Path
) -> None:
    qfile = _count_questions(synth_dir, tmp_path / "q.jsonl")
    out = tmp_path / "p.jsonl"
    cfg = EvalConfig(
        model=str(says_two_vlm), questions=qfile, out=out, progress=False,
        max_new_tokens=1, rationale=True, rationale_max_new_tokens=10,
    )  # fmt: skip
    rep = run_eval(cfg)
    right, wrong = read_jsonl(out)
    # One new token is all the short answer gets: "so", wrong for both questions ...
    assert [right["prediction"], wrong["prediction"]] == ["so", "so"]
    assert [right["score"], wrong["score"]] == [0.0, 0.0]
    # ... while the rationale runs to its end, and its stated answer is what is scored.
    assert right["rationale"] == wrong["rationale"] == "so the answer is 2 ."
    assert right["rationale_answer"] == wrong["rationale_answer"] == "2"
    assert (right["metric"], right["rationale_score"], wrong["rationale_score"]) == (
        "count", 1.0, 0.0,
    )  # fmt: skip
    assert rep["accuracy"] == 0.0 and rep["rationale_accuracy"] == 0.5


def test_batched_and_unbatched_greedy_agree(tiny_vlm: Path, synth_dir: Path, tmp_path: Path):
    one = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "b1.jsonl", batch_size=1))
    many = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "b5.jsonl", batch_size=5))
    p1, p5 = read_jsonl(tmp_path / "b1.jsonl"), read_jsonl(tmp_path / "b5.jsonl")
    assert len(p1) == len(p5) == one["n"] == many["n"]
    assert [p["raw"] for p in p1] == [p["raw"] for p in p5]
    # The questions differ in length, so batch 5 really padded (left) and still agreed.
    assert len({len(q.question) for q in read_jsonl(synth_dir / "test.jsonl", Question)}) > 1


def test_out_of_memory_splits_the_batch(
    tiny_vlm: Path, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch too big for the GPU is halved and retried: same answers, nothing lost."""
    import torch

    from vpd.evaluate import Generator

    real = Generator._generate
    sizes: list[int] = []

    def small_gpu(self, images, prompts, n):  # a fake GPU that fits 2 prompts at a time
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(self, images, prompts, n)

    ref = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "ref.jsonl", batch_size=1))
    monkeypatch.setattr(Generator, "_generate", small_gpu)
    rep = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "oom.jsonl", batch_size=8))
    assert rep["oom_splits"] >= 1 and rep["new"] == ref["new"]
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2  # later batches stay small
    assert [p["raw"] for p in read_jsonl(tmp_path / "oom.jsonl")] == [
        p["raw"] for p in read_jsonl(tmp_path / "ref.jsonl")
    ]


def test_model_without_chat_template_gets_a_plain_prompt(synth_dir: Path, tmp_path: Path) -> None:
    model = build_tiny_llava(tmp_path / "plain-llava", chat_template=False)
    rep = run_eval(_cfg(model, synth_dir, tmp_path / "p.jsonl", limit=2))
    assert rep["prompt_format"] == "plain" and rep["new"] == 2
    # --chat-template FILE supplies one (and is part of the run's identity).
    tpl = tmp_path / "tpl.jinja"
    tpl.write_text(TEMPLATE)
    out = tmp_path / "t.jsonl"
    rep = run_eval(_cfg(model, synth_dir, out, limit=2, chat_template=tpl))
    assert rep["prompt_format"] == "file"
    assert "chat_template" in json.loads(Path(f"{out}.meta.json").read_text())["config"]
    ref = run_eval(
        _cfg(build_tiny_llava(tmp_path / "ref"), synth_dir, tmp_path / "r.jsonl", limit=2)
    )
    assert ref["prompt_format"] == "model"
    assert [p["raw"] for p in read_jsonl(out)] == [
        p["raw"] for p in read_jsonl(tmp_path / "r.jsonl")
    ]
    with pytest.raises(VpdError, match="--chat-template"):
        run_eval(_cfg(model, synth_dir, tmp_path / "x.jsonl", chat_template=tmp_path / "no"))


def _build_tiny_paligemma(out: Path) -> Path:
    """Another family (SigLIP + Gemma, no chat template, the processor expands <image>)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # (32 / 8) ** 2 patches
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=GemmaConfig(
            vocab_size=len(WORDS),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ),
        image_token_id=vocab["<image>"],
        projection_dim=32,
        hidden_size=32,
    )
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_another_vlm_family_paligemma(synth_dir: Path, tmp_path: Path) -> None:
    model = _build_tiny_paligemma(tmp_path / "paligemma")
    one = run_eval(_cfg(model, synth_dir, tmp_path / "p1.jsonl", max_new_tokens=4, batch_size=1))
    four = run_eval(_cfg(model, synth_dir, tmp_path / "p4.jsonl", max_new_tokens=4, batch_size=4))
    # No template shipped: the layout `vpd tune` trains PaliGemma with.
    assert one["prompt_format"] == "paligemma" and one["new"] == four["new"] == one["questions"]
    p1, p4 = read_jsonl(tmp_path / "p1.jsonl"), read_jsonl(tmp_path / "p4.jsonl")
    assert [p["raw"] for p in p1] == [p["raw"] for p in p4]


def test_resume_fills_only_missing(tiny_vlm: Path, synth_dir: Path, tmp_path: Path):
    out = tmp_path / "r.jsonl"
    first = run_eval(_cfg(tiny_vlm, synth_dir, out, limit=3))
    assert first["new"] == 3 and len(read_jsonl(out)) == 3
    head = out.read_text()
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a kill mid-write leaves a partial line
    full = run_eval(_cfg(tiny_vlm, synth_dir, out, batch_size=4))  # batch size may change
    n = len(read_jsonl(synth_dir / "test.jsonl", Question))
    assert full["already_done"] == 3 and full["new"] == n - 3 and full["predicted"] == n
    text = out.read_text()
    assert text.startswith(head) and '"torn' not in text
    assert len({p["id"] for p in read_jsonl(out)}) == n
    again = run_eval(_cfg(tiny_vlm, synth_dir, out))
    assert again["new"] == 0 and again["already_done"] == n and again["generate_s"] == 0
    assert again["accuracy"] == full["accuracy"]


def test_resume_with_other_generation_params_is_refused(
    tiny_vlm: Path, synth_dir: Path, tmp_path: Path
):
    out = tmp_path / "m.jsonl"
    run_eval(_cfg(tiny_vlm, synth_dir, out, limit=1))
    with pytest.raises(ConfigMismatch, match="max_new_tokens"):
        run_eval(_cfg(tiny_vlm, synth_dir, out, limit=1, max_new_tokens=3))
    rep = run_eval(_cfg(tiny_vlm, synth_dir, out, limit=1, max_new_tokens=3, force=True))
    assert rep["new"] == 1 and list(tmp_path.glob("m.jsonl.*.bak"))


def test_shards_split_the_questions(tiny_vlm: Path, synth_dir: Path, tmp_path: Path):
    a = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "s0.jsonl", shard="0/2"))
    b = run_eval(_cfg(tiny_vlm, synth_dir, tmp_path / "s1.jsonl", shard="1/2"))
    ids0 = {p["id"] for p in read_jsonl(tmp_path / "s0.jsonl")}
    ids1 = {p["id"] for p in read_jsonl(tmp_path / "s1.jsonl")}
    assert not ids0 & ids1
    assert ids0 | ids1 == {q.id for q in read_jsonl(synth_dir / "test.jsonl", Question)}
    assert a["shard"] == "0/2" and a["n"] + b["n"] == len(ids0 | ids1)


def test_missing_and_broken_images_are_rejected(tiny_vlm: Path, synth_dir: Path, tmp_path: Path):
    qs = [json.loads(ln) for ln in (synth_dir / "test.jsonl").read_text().splitlines()][:3]
    img = synth_dir / qs[0]["image"]
    qs[0]["image"] = str(img)  # absolute path: fine
    qs[1]["image"] = "nowhere.png"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    qs[2]["image"] = "broken.png"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs) + "not json\n")
    out = tmp_path / "p.jsonl"
    rep = run_eval(EvalConfig(model=str(tiny_vlm), questions=qfile, out=out, progress=False))
    assert [p["id"] for p in read_jsonl(out)] == [qs[0]["id"]]
    rejects = read_rejects(out)
    reasons = " | ".join(r["reason"] for r in rejects)
    assert rep["rejected"] == 3 and len(rejects) == 3
    assert "image not found" in reasons and "could not be decoded" in reasons
    assert "malformed JSON" in reasons


def test_unlabelled_questions_are_predicted_not_scored(
    yes_vlm: Path, synth_dir: Path, tmp_path: Path
) -> None:
    qs = [json.loads(ln) for ln in (synth_dir / "test.jsonl").read_text().splitlines()][:4]
    for q in qs:
        q["image"] = str(synth_dir / q["image"])  # absolute: the file lives elsewhere
    for q in qs[:2]:
        q["answers"] = []
    qfile = tmp_path / "unlabelled.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = tmp_path / "u.jsonl"
    rep = run_eval(
        EvalConfig(model=str(yes_vlm), questions=qfile, out=out, max_new_tokens=1, progress=False)
    )
    preds = read_jsonl(out)
    assert [p["score"] for p in preds[:2]] == [None, None]
    assert all(p["prediction"] == "yes" for p in preds)
    assert rep["predicted"] == 4 and rep["unscored"] == 2 and rep["n"] == 2
    want = [score_answer("yes", Question.model_validate(q)) for q in qs[2:]]
    assert rep["accuracy"] == pytest.approx(sum(want) / 2, abs=1e-6)


def test_all_rejected_or_empty_is_an_error(tiny_vlm: Path, tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(VpdError, match="holds no records"):
        run_eval(EvalConfig(model=str(tiny_vlm), questions=empty, out=tmp_path / "e.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q", "image": "gone.png", "question": "?"}) + "\n")
    with pytest.raises(VpdError, match="all 1 lines were rejected"):
        run_eval(EvalConfig(model=str(tiny_vlm), questions=bad, out=tmp_path / "b.jsonl"))


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(yes_vlm: Path, synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    r = run_vpd(
        "eval",
        str(yes_vlm),
        "--questions",
        str(synth_dir / "test.jsonl"),
        "--out",
        str(out),
        "--train-questions",
        str(synth_dir / "train.jsonl"),
        "--max-new-tokens",
        "1",
        "--limit",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert "majority baseline" in r.stderr and "accuracy" in r.stderr
    assert len(read_jsonl(out)) == 4


def test_cli_rationale(says_two_vlm: Path, synth_dir: Path, tmp_path: Path) -> None:
    qfile = _count_questions(synth_dir, tmp_path / "q.jsonl")
    out = tmp_path / "cli.jsonl"
    r = run_vpd(
        "eval", str(says_two_vlm), "--questions", str(qfile), "--out", str(out),
        "--max-new-tokens", "1", "--rationale", "--rationale-max-new-tokens", "10",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    preds = read_jsonl(out)
    assert [p["rationale_answer"] for p in preds] == ["2", "2"]
    assert [p["rationale_score"] for p in preds] == [1.0, 0.0]
    assert json.loads(Path(f"{out}.report.json").read_text())["rationale_accuracy"] == 0.5
    assert "accuracy 0.0%" in r.stderr and "rationale accuracy 50.0%" in r.stderr


def _one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, r.stderr
    assert text in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3  # one message (rich may wrap it)


def test_cli_bad_model_paths(tmp_path: Path, synth_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    q = str(synth_dir / "test.jsonl")
    out = str(tmp_path / "o.jsonl")
    _one_line_error(
        run_vpd("eval", str(tmp_path / "nope"), "--questions", q, "--out", out), "not found"
    )
    (tmp_path / "empty").mkdir()
    _one_line_error(
        run_vpd("eval", str(tmp_path / "empty"), "--questions", q, "--out", out), "no config.json"
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    lm.save_pretrained(tmp_path / "textonly")
    _one_line_error(
        run_vpd("eval", str(tmp_path / "textonly"), "--questions", q, "--out", out),
        "not a vision-language model",
    )
    assert not Path(out).exists()


def test_local_path_typo_is_not_tried_on_the_hub(
    tmp_path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cfg = EvalConfig(model="runs/modle", questions=synth_dir / "test.jsonl", out=tmp_path / "o")
    with pytest.raises(VpdError, match="model not found: runs/modle"):
        run_eval(cfg)


def test_cli_bad_flags(tmp_path: Path, synth_dir: Path, tiny_vlm: Path) -> None:
    q = str(synth_dir / "test.jsonl")
    out = str(tmp_path / "o.jsonl")
    _one_line_error(
        run_vpd("eval", str(tiny_vlm), "--questions", q, "--out", out, "--device", "tpu"),
        "--device",
    )
    _one_line_error(
        run_vpd("eval", str(tiny_vlm), "--questions", q, "--out", out, "--metric", "bleu"),
        "--metric",
    )
    _one_line_error(
        run_vpd("eval", str(tiny_vlm), "--questions", str(tmp_path / "no.jsonl"), "--out", out),
        "not found",
    )
    _one_line_error(
        run_vpd("eval", str(tiny_vlm), "--questions", q, "--out", out, "--shard", "2/2"), "--shard"
    )


def test_cli_help_has_example() -> None:
    r = run_vpd("eval", "--help")
    assert r.returncode == 0 and "Example:" in r.stdout and "--train-questions" in r.stdout


@pytest.mark.slow
def test_eval_the_pipelines_tiny_vlm(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The default VLM's family (SmolLM2 + tower + resampler, `vpd tune --init tiny`; its
    build stages at toy sizes), given as a tune output folder: its final/ is found, its
    ChatML template used, batching changes nothing."""
    from tests.helpers import SMALL_TINY
    from vpd.tune.model import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny-vlm-run")
    b = SMALL_TINY
    build_tiny_vlm(root / "model" / "final", None, b.vision, b.resampler, b.align, False)
    one = run_eval(_cfg(root / "model", synth_dir, root / "b1.jsonl", limit=6, max_new_tokens=6))
    three = run_eval(
        _cfg(root / "model", synth_dir, root / "b3.jsonl", limit=6, max_new_tokens=6, batch_size=3)
    )
    assert one["prompt_format"] == three["prompt_format"] == "model"
    assert one["new"] == three["new"] == 6
    p1, p3 = read_jsonl(root / "b1.jsonl"), read_jsonl(root / "b3.jsonl")
    assert [p["raw"] for p in p1] == [p["raw"] for p in p3]
    assert all(p["raw"].strip() for p in p1)  # a real LM says something
    assert "<|im_end|>" not in " ".join(p["raw"] for p in p1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "paligemma"])
def test_each_tune_family_evaluates_batched_like_unbatched(
    family: str, synth_dir: Path, tmp_path: Path
) -> None:
    """The tuner's tiny model of every supported family: loads, prompts, batches alike."""
    from vpd.tune.tiny import build_tiny_family

    model = build_tiny_family(family, tmp_path / family)
    one = run_eval(_cfg(model, synth_dir, tmp_path / "1.jsonl", max_new_tokens=4, batch_size=1))
    four = run_eval(_cfg(model, synth_dir, tmp_path / "4.jsonl", max_new_tokens=4, batch_size=4))
    assert one["new"] == four["new"] == one["questions"] and one["prompt_format"] == "model"
    p1, p4 = read_jsonl(tmp_path / "1.jsonl"), read_jsonl(tmp_path / "4.jsonl")
    assert [p["raw"] for p in p1] == [p["raw"] for p in p4]


def test_qwen2_vl_processor_loads_for_images_without_torchvision(tmp_path: Path) -> None:
    """A Qwen2-VL folder as the hub ships it (a video processor config beside the image
    one) loads through the product path for images on any machine: where torchvision is
    missing, transformers cannot build the video half (ImportError), and the processor
    comes without it, with the PIL image processor."""
    from PIL import Image
    from transformers import LlavaProcessor, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    from vpd.tune.tiny import build_tiny_family
    from vpd.vlm import image_only_processor_class, load_processor

    assert image_only_processor_class(LlavaProcessor) is None  # no video half to leave out
    assert image_only_processor_class(Qwen2VLProcessor).get_attributes() == [
        "image_processor",
        "tokenizer",
    ]
    model = build_tiny_family("qwen2_vl", tmp_path / "qwen")
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor",
             "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}  # fmt: skip
    (model / "video_preprocessor_config.json").write_text(json.dumps(video))
    proc = load_processor(model)
    assert type(proc).__name__ == "Qwen2VLProcessor"
    if not is_torchvision_available():
        assert proc.get_attributes() == ["image_processor", "tokenizer"]
        assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(images=[Image.new("RGB", (80, 60))], text=[text], return_tensors="pt")
    # One image slot expanded to its merged patches: (t * h * w) / merge_size**2 tokens.
    grid = inputs["image_grid_thw"][0]
    n_image = int((inputs["input_ids"] == proc.image_token_id).sum())
    assert n_image == int(grid.prod()) // 4 > 0
    assert inputs["pixel_values"].shape[0] == int(grid.prod())
