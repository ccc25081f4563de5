"""The tune step: ``vpd tune`` trains each student (``student``: the tools' VLM, ``tiny`` by
default) on its variant's records: ``OUT/<variant>/student/final``. Also what a VLM name
means here (``tiny``: the tiny VLM as the students' tune options build it)."""

from __future__ import annotations

from typing import Any

from vpd.sdvp.config import SdvpConfig, SdvpRun, Variant, variants
from vpd.tune import TuneConfig, load_tune_config, run_tune
from vpd.tune.model import TINY, resolve_vlm
from vpd.vlm import resolve_model


def model_path(name: str, tune: dict[str, Any] | None = None) -> str:
    """A VLM folder for ``name``; ``tiny`` is the embedded tiny VLM as ``vpd tune`` builds it."""
    if name == TINY:
        t = tune or {}
        return resolve_vlm(TINY, t.get("tiny_build"), t.get("tiny_lm_layers"))
    return resolve_model(name)


def tune_config(cfg: SdvpConfig, variant: Variant) -> TuneConfig:
    """The `vpd tune` config of one student (tune recipe < cfg.tune; the student is ``init``)."""
    return load_tune_config(
        cfg.tune_recipe,
        None,
        **cfg.tune,
        sft=cfg.out / variant.name / "sft.jsonl",
        out=cfg.out / variant.name / "student",
        init=cfg.student,
        force=cfg.force or None,
        progress=cfg.progress,
    )


def tune_step(run: SdvpRun) -> None:
    """Each variant's student, tuned (resumed from its checkpoints); ``report.variants.*.tune``."""
    for v in variants(run.cfg):
        summary = run_tune(tune_config(run.cfg, v))
        run.report["variants"][v.name]["tune"] = {
            k: summary.get(k) for k in ("steps", "train_loss", "wall_s", "skipped")
        }
