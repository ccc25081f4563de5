"""The files of a run directory (``vpd run``): one place, read by the pipeline and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
        """The vpd arm's tuned model (``final/`` inside)."""
        return self.root / "model"

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

    def preds(self, which: str) -> Path:
        return self.root / "eval" / f"{which}.jsonl"

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
        "tune": [p.model],
        "labels": [p.root / "labels"],
        "eval": [p.root / "eval"],
        "programs": [p.programs],
        "sdvp": [p.sdvp],
    }[stage]
