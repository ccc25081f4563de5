"""The files of a run directory (``vpd run``): one place, read by the pipeline and the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vpd.errors import VpdError

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


def round_files(out: Path) -> dict[str, Path]:
    """The files of one writer round's folder (`vpd.writer.rounds`)."""
    out = Path(out)
    return {
        "model": out / "model",
        "final": out / "model" / "final",
        "samples": out / "samples.jsonl",
        "executions": out / "executions.jsonl",
        "verified": out / "verified.jsonl",
        "spread": out / "spread.jsonl",
        "spread_runs": out / "spread",
        "marker": out / "round.json",
    }


def writer_rounds(recipe: dict[str, Any]) -> int:
    """How many rounds of writer tuning a recipe asks for (``writer.rounds``; 0: no
    ``writer:`` section)."""
    section = recipe.get("writer")
    if section is None:
        return 0
    if not isinstance(section, dict):
        raise VpdError("recipe section 'writer' must be a mapping")
    rounds = section.get("rounds", 1)
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise VpdError(f"writer.rounds must be an integer >= 1, got {rounds!r}")
    return rounds


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

    def vlm_preds(self, arm: str) -> Path:
        """A VLM arm's answers at the run's first seed, as they are on disk."""
        # Runs made before the ablation named the vpd arm's answers eval/tuned.jsonl.
        if arm == "vpd" and not self.preds("vpd").exists() and self.preds("tuned").exists():
            return self.preds("tuned")
        return self.preds(arm)

    def writer_round(self, r: int) -> Path:
        """Round ``r`` of writer tuning (`vpd.writer.rounds`); round 0 is the run's own
        sample/execute/verify, made by the untuned writer."""
        return self.root / "writer" / f"round{r}"

    def final_programs(self, rounds: int) -> tuple[Path, Path, Path]:
        """(samples, executions, verified) of the run's final writer: the last round's, or
        the run's own without writer rounds."""
        if rounds <= 0:
            return self.samples, self.executions, self.verified
        f = round_files(self.writer_round(rounds))
        return f["samples"], f["executions"], f["verified"]

    def round_programs(self, r: int, rounds: int) -> Path:
        """The programs arm's folder for the writer of round ``r``: the final writer's is the
        run's ``programs`` arm, the others' lie in their round's folder."""
        return self.programs if r == rounds else self.writer_round(r) / "programs"

    @property
    def sdvp(self) -> Path:
        """`vpd sdvp`'s folder (its report: ``sdvp/sdvp.json``)."""
        return self.root / "sdvp"

    @property
    def sdvp_samples(self) -> Path:
        """Programs for the test questions: SDVP's held-out programs."""
        return self.sdvp / "test-samples.jsonl"

    @property
    def recipe(self) -> Path:
        """The recipe `vpd run` saved (overrides applied)."""
        return self.root / "recipe.yaml"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"


def saved_recipe(p: RunPaths) -> dict[str, Any]:
    """The recipe `vpd run` saved in the run directory (overrides applied), or {}."""
    try:
        recipe = yaml.safe_load(p.recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}
