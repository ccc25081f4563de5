"""VPD's objective (the ``question`` layout): one example per question, each task's loss
averaged over its own tokens and summed, checked against values computed by hand; and the
labels arm (rationale weight 0) sees exactly the vpd arm's answer examples, in order."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vpd.errors import VpdError
from vpd.tune.data import (
    QuestionDataset,
    TaskCollator,
    group_questions,
    prepare,
    read_sft,
)
from vpd.tune.loss import IGNORE_INDEX, row_weights, weighted_rows_loss
from vpd.tune.train import length_grouped_trainer, question_trainer

from .helpers import write_jsonl

LN2 = math.log(2)


@pytest.fixture(scope="module")
def tiny_llava_processor(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from vpd.tune.tiny import build_tiny_family
    from vpd.vlm import load_processor

    return load_processor(build_tiny_family("llava", tmp_path_factory.mktemp("llava")))


def _logits_for(probs: list[float], vocab: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax gives the target token (id 0) probability ``p`` at each
    position, the rest of the mass spread evenly; targets all 0."""
    rows = []
    for p in probs:
        rest = (1 - p) / (vocab - 1)
        rows.append([math.log(p)] + [math.log(rest)] * (vocab - 1))
    return torch.tensor(rows), torch.zeros(len(probs), dtype=torch.long)


def _pad(seqs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(t) for _, t in seqs)
    logits = torch.zeros(len(seqs), longest, 4)
    targets = torch.full((len(seqs), longest), IGNORE_INDEX)
    for i, (lg, t) in enumerate(seqs):
        logits[i, : len(t)] = lg
        targets[i, : len(t)] = t
    return logits, targets


def test_row_weights_average_each_task_over_its_sequences_and_the_batch() -> None:
    tasks = [["answer", "rationale", "rationale"], ["answer"]]
    w = row_weights(tasks, {"rationale": 0.5})
    assert w == pytest.approx([1 / 2, 0.5 / 2 / 2, 0.5 / 2 / 2, 1 / 2])


@pytest.mark.parametrize(
    ("weights", "expected"), [({}, 2.75 * LN2), ({"rationale": 0.5}, 2.5 * LN2)]
)
def test_two_task_loss_on_a_constructed_batch_equals_the_hand_computed_value(
    weights: dict[str, float], expected: float
) -> None:
    # Example 0: answer of 2 tokens (p = 1/2, 1/4) and a rationale of 3 tokens (p = 1/2);
    # example 1: answer of 1 token (p = 1/8). By hand, with w = weights:
    #   L = 1/2 * [ (ln2 + ln4)/2 + w_r * (3 ln2)/3 + ln8 ] = 1/2 * (1.5 + w_r + 3) ln2
    a0 = _logits_for([0.5, 0.25])
    r0 = _logits_for([0.5, 0.5, 0.5])
    a1 = _logits_for([0.125])
    w = row_weights([["answer", "rationale"], ["answer"]], weights)
    answers = _pad([a0, a1])
    rationales = _pad([r0])
    total = weighted_rows_loss(*answers, torch.tensor([w[0], w[2]])) + weighted_rows_loss(
        *rationales, torch.tensor([w[1]])
    )
    assert float(total) == pytest.approx(expected, rel=1e-6)


class _ScriptedModel(torch.nn.Module):
    """Stands in for a VLM in the loss test: returns the logits it was built with for the
    rows it is given (by their first input id), at the requested positions."""

    def __init__(self, table: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):  # noqa: ANN001, ANN201
        rows = []
        for ids in input_ids:
            lg = self.table[int(ids[0])]
            full = torch.zeros(input_ids.shape[1], lg.shape[1])
            full[: len(lg)] = lg
            rows.append(full)
        logits = torch.stack(rows)
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_question_trainer_loss_matches_the_hand_computed_value() -> None:
    """The trainer's compute_loss over a TaskCollator batch gives the same value: the batch
    layout (answers and rationales padded apart, weights per row) is what the loss defines."""

    def seq(first_id: int, probs: list[float]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        # Position 0 is the prompt; label i+1 is predicted by logits at i (the shift).
        lg, _ = _logits_for(probs)
        n = len(probs) + 1
        ids = torch.full((n,), first_id)
        labels = torch.tensor([IGNORE_INDEX] + [0] * len(probs))
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": labels,
        }, lg

    a0, la0 = seq(10, [0.5, 0.25])
    r0, lr0 = seq(11, [0.5, 0.5, 0.5])
    a1, la1 = seq(12, [0.125])
    batch = TaskCollator(pad_token_id=0, weights={})(
        [[("answer", a0), ("rationale", r0)], [("answer", a1)]]
    )
    assert set(batch) == {"answer", "rationale"}
    model = _ScriptedModel({10: la0, 11: lr0, 12: la1})
    trainer_cls = question_trainer(object)
    trainer = trainer_cls.__new__(trainer_cls)
    loss = trainer_cls.compute_loss(trainer, model, batch)
    assert float(loss) == pytest.approx(2.75 * LN2, rel=1e-6)
    assert trainer_cls.loss_is_scaled_for_ga is False  # Trainer divides by accumulation


# ----------------------------------------------------------------------------- data


def _sft(tmp: Path, n: int = 6, rationale_every: int = 2) -> Path:
    Image.new("RGB", (32, 32), "white").save(tmp / "im.png")
    rows = []
    for i in range(n):
        q = f"q{i}"
        user = [{"type": "image"}, {"type": "text", "text": f"How many? {'x' * i}"}]
        rows.append(
            {
                "id": f"{q}/answer",
                "qid": q,
                "image": "im.png",
                "task": "answer",
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": str(i)},
                ],
            }
        )
        if i % rationale_every == 0:
            rows.append(
                {
                    "id": f"{q}/rationale",
                    "qid": q,
                    "image": "im.png",
                    "task": "rationale",
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": f"I count {i} things. So {i}."},
                    ],
                }
            )
    return write_jsonl(tmp / "sft.jsonl", rows)


def test_group_questions_puts_the_answer_first_and_drops_zero_weight_tasks(tmp_path: Path) -> None:
    examples = read_sft(_sft(tmp_path))
    groups, orphans = group_questions(examples, {})
    assert [g.id for g in groups] == [f"q{i}" for i in range(6)]
    assert [g.tasks for g in groups[:2]] == [["answer", "rationale"], ["answer"]]
    assert not orphans
    labels, _ = group_questions(examples, {"rationale": 0})
    assert all(g.tasks == ["answer"] for g in labels)


def test_labels_arm_sees_exactly_the_vpd_arms_answer_examples_in_the_same_order(
    tmp_path: Path, tiny_llava_processor
) -> None:
    sft = _sft(tmp_path, n=12)
    common = {"processor": tiny_llava_processor, "max_length": 512, "progress": False}
    vpd_set, vpd_stats = prepare(sft, **common)
    lab_set, lab_stats = prepare(sft, task_weights={"rationale": 0}, **common)
    assert isinstance(vpd_set, QuestionDataset) and isinstance(lab_set, QuestionDataset)
    assert vpd_stats.examples == lab_stats.examples == 12
    assert vpd_stats.per_task == {"answer": 12, "rationale": 6}
    assert lab_stats.per_task == {"answer": 12}
    assert vpd_set.lengths == lab_set.lengths  # so length-grouped batches are drawn alike
    # The samplers of the two arms (same seed) give the same order of the same questions.
    trainer = length_grouped_trainer(object)
    orders = []
    for ds in (vpd_set, lab_set):
        t = trainer.__new__(trainer)
        t.train_dataset = ds
        t.args = SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=1, data_seed=3)
        orders.append([ds.examples[i].id for i in t._get_train_sampler()])
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(f"q{i}" for i in range(12))
    for v, lab in zip(vpd_set.examples, lab_set.examples, strict=True):
        assert v.parts[0].id == lab.parts[0].id and v.parts[0].task == "answer"
        assert v.parts[0].messages == lab.parts[0].messages
    # The answer sequences encode to the very same tokens in both arms.
    for i in range(12):
        (task_v, fv), *_ = vpd_set[i]
        ((task_l, fl),) = lab_set[i]
        assert task_v == task_l == "answer"
        assert torch.equal(fv["input_ids"], fl["input_ids"])
        assert torch.equal(fv["labels"], fl["labels"])


def test_question_layout_rejects_a_rationale_without_its_answer(
    tmp_path: Path, tiny_llava_processor
) -> None:
    from vpd.store import RejectWriter

    sft = _sft(tmp_path, n=2)
    rows = sft.read_text().splitlines()
    sft.write_text("\n".join(r for r in rows if '"q2/answer"' not in r and '"q0/answer"' not in r))
    with RejectWriter(tmp_path / "rej.jsonl") as rej:
        ds, stats = prepare(sft, processor=tiny_llava_processor, progress=False, rejects=rej)
    assert [g.id for g in ds.examples] == ["q1"]
    assert "no answer record" in (tmp_path / "rej.jsonl").read_text()
    with pytest.raises(VpdError, match="answer task"):
        prepare(sft, processor=tiny_llava_processor, task_weights={"answer": 0}, progress=False)
