"""The training losses of `vpd tune`: next-token cross-entropy on the labelled tokens only.

Two ways to average it, one per data layout (:mod:`vpd.tune.data`):

- ``records``: one sequence per SFT record, the batch's labelled tokens averaged together
  (the model's own loss, what HF Trainer computes);
- ``question`` (VPD's objective, Hu et al. 2024, Sec. 3): one example per question holding
  one sequence per task (the answer task, and the rationale task where a program was kept).
  Each task's cross-entropy is averaged over that task's own tokens, the task losses are
  weighted (``task_weights``, 1 by default) and summed, and the batch's loss is the mean of
  its examples' losses:

      L = 1/B * sum_i sum_t w_t * mean_{tokens of task t in example i} CE

  so a long rationale does not drown its short answer, and the answer term is the same
  whether or not the example has a rationale. A question with several rationales averages
  them (the task still weighs ``w_t``). The collator turns this into one weight per
  sequence (row): ``w_t / (task t's sequences in its example) / B``; :func:`weighted_rows_loss`
  sums ``weight * (the row's mean token loss)``.

Both project onto the vocabulary only at positions whose next token is labelled (the rest
is prompt and image, label -100), which computes the same loss for a fraction of the head.
"""

from __future__ import annotations

import inspect
from typing import Any

IGNORE_INDEX = -100


def accepts_logits_to_keep(model: Any) -> bool:
    """Does the (unwrapped, maybe PEFT-wrapped) model's forward take ``logits_to_keep``?"""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def labelled_logits(model: Any, inputs: dict[str, Any], labels: Any) -> tuple[Any, Any, Any]:
    """Run ``model`` and return ``(logits, targets, outputs)`` at the positions whose next
    token is labelled in any row (logits: [rows, kept, vocab]; targets: [rows, kept])."""
    shift = labels[:, 1:]
    keep = (shift != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if accepts_logits_to_keep(model):
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits
    else:
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1][:, keep]
    return logits.float(), shift[:, keep].to(logits.device), outputs


def token_losses(logits: Any, targets: Any) -> Any:
    """Per-token cross-entropy ``[rows, positions]``, 0 where the target is -100."""
    import torch.nn.functional as F

    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return flat.view(targets.shape)


def weighted_rows_loss(logits: Any, targets: Any, row_weight: Any) -> Any:
    """``sum_r row_weight[r] * mean CE over row r's labelled tokens`` (rows with no
    labelled token add 0)."""
    per_token = token_losses(logits, targets)
    n = (targets != IGNORE_INDEX).sum(dim=1)
    per_row = per_token.sum(dim=1) / n.clamp(min=1)
    return (per_row * row_weight.to(per_row.dtype)).sum()


def row_weights(tasks_per_example: list[list[str]], weights: dict[str, float]) -> list[float]:
    """One weight per sequence, in example order then sequence order:
    ``w_task / (sequences of that task in the example) / examples``."""
    b = len(tasks_per_example)
    out: list[float] = []
    for tasks in tasks_per_example:
        for task in tasks:
            out.append(weights.get(task, 1.0) / tasks.count(task) / b)
    return out
