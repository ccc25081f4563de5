"""Fine-tuning VLMs on distilled SFT data (``vpd tune``): data, model loading, training.

``TuneConfig`` and ``run_tune`` are what ``vpd run`` drives; the heavy modules (torch,
transformers, deepspeed) load only when ``run_tune`` is called.
"""

from __future__ import annotations

from typing import Any

from vpd.tune.config import TuneConfig, load_tune_config

__all__ = ["TuneConfig", "load_tune_config", "run_tune"]


def run_tune(cfg: TuneConfig) -> dict[str, Any]:
    from vpd.tune.train import run_tune as _run

    return _run(cfg)
