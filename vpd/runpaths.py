"""The files of a run directory (``vpd run``): one place, read by the pipeline and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("data", "sample", "execute", "verify", "rationalize", "tune", "eval", "sdvp")


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
        return self.root / "model"

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
        "eval": [p.root / "eval"],
        "sdvp": [p.sdvp],
    }[stage]
