"""The files of a run directory (``vpd run``): one place, read by the pipeline and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpd.errors import VpdError

STAGES = (
    "data",
    "sample",
    "execute",
    "verify",
    "rationalize",
    "tune",
    "labels",
    "eval",
    "programs",
    "sdvp",
)
# What each stage reads: when one of these (or what they read) runs again, so must it.
# The ablation arms hang off the chain: `labels` needs the data (and, for its step budget,
# the vpd arm's tuning), `programs` only the test questions.
DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "sample": ("data",),
    "execute": ("sample",),
    "verify": ("execute",),
    "rationalize": ("verify",),
    "tune": ("rationalize",),
    "labels": ("data", "tune"),
    "eval": ("tune", "labels"),
    "programs": ("data",),
    # SDVP distils the tuned VLM (its teacher) on the run's executed programs.
    "sdvp": ("data", "execute", "tune"),
}
# The arms of the ablation, in report order; `eval/<arm>.jsonl` holds a VLM arm's answers.
VLM_ARMS = ("untuned", "labels", "vpd")
ARMS = (*VLM_ARMS, "programs", "majority")


def recipe_seeds(recipe: dict[str, Any]) -> list[int]:
    """The tuning seeds of a recipe's VLM arms (``seeds: [0, 1, 2]`` at its top level;
    default: the tune section's one seed). The first is the run's main model."""
    raw = recipe.get("seeds")
    if raw is None:
        return [int((recipe.get("tune") or {}).get("seed", 0))]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, int) for x in raw):
        raise VpdError(f"recipe `seeds` must be a list of integers, got {raw!r}")
    if len(set(raw)) != len(raw):
        raise VpdError(f"recipe `seeds` repeats a seed: {raw}")
    return list(raw)


def upstream(stage: str) -> set[str]:
    """Every stage ``stage`` reads from, directly or not."""
    seen: set[str] = set()
    todo = list(DEPENDS[stage])
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(DEPENDS[s])
    return seen


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run, derived from its directory."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train(self) -> Path:
        return self.data_dir / "train.jsonl"

    @property
    def test(self) -> Path:
        return self.data_dir / "test.jsonl"

    @property
    def val(self) -> Path:
        """Validation questions (held-out training images): settings are chosen on them."""
        return self.data_dir / "val.jsonl"

    @property
    def sft_val(self) -> Path:
        """The validation questions as answer records: `vpd tune` scores its loss per epoch."""
        return self.root / "sft-val.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def executions(self) -> Path:
        return self.root / "executions.jsonl"

    @property
    def verified(self) -> Path:
        return self.root / "verified.jsonl"

    @property
    def sft(self) -> Path:
        return self.root / "sft.jsonl"

    @property
    def model(self) -> Path:
        """The vpd arm's tuned model (``final/`` inside), at the run's first seed."""
        return self.root / "model"

    def arm_model(self, arm: str, seed: int, first: bool) -> Path:
        """A VLM arm's tuned model folder at ``seed`` (``first``: the run's first seed, the
        one a single-seed run tunes): ``model``, ``model-seed1``, ``labels/model``..."""
        base = self.model if arm == "vpd" else self.model_labels
        return base if first else base.with_name(f"{base.name}-seed{seed}")

    @property
    def sft_labels(self) -> Path:
        """The labels arm's training data: answers with human labels only."""
        return self.root / "labels" / "sft.jsonl"

    @property
    def model_labels(self) -> Path:
        return self.root / "labels" / "model"

    @property
    def programs(self) -> Path:
        """The programs arm's folder (samples, executions, preds, report)."""
        return self.root / "programs"

    def preds(self, which: str, seed: int | None = None) -> Path:
        """A VLM arm's answers on the test split (``seed``: one of the other seeds')."""
        name = which if seed is None else f"{which}-seed{seed}"
        return self.root / "eval" / f"{name}.jsonl"

    @property
    def sdvp(self) -> Path:
        """`vpd sdvp`'s folder (its report: ``sdvp/sdvp.json``)."""
        return self.root / "sdvp"

    @property
    def sdvp_samples(self) -> Path:
        """Programs for the test questions: SDVP's held-out programs."""
        return self.sdvp / "test-samples.jsonl"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"


def stage_outputs(stage: str, p: RunPaths) -> list[Path]:
    """The files/folders a stage writes (its side files share the name as a prefix)."""
    return {
        "data": [p.data_dir],
        "sample": [p.samples],
        "execute": [p.executions],
        "verify": [p.verified],
        "rationalize": [p.sft],
        "tune": [p.model, p.sft_val],
        "labels": [p.root / "labels"],
        "eval": [p.root / "eval"],
        "programs": [p.programs],
        "sdvp": [p.sdvp],
    }[stage]
