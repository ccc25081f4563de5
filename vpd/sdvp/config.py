"""What every SDVP step is given: the options (:class:`SdvpConfig`, also the ``sdvp:``
section of a recipe), the Teacher Input Adapter settings it distils (:class:`Variant`), and
what the steps share as they run (:class:`SdvpRun`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vpd.records import SubTask
from vpd.tools.backends.vlm import VLM_OPS
from vpd.tune import load_tune_config

# The steps `until` may stop after, in the order they run (vpd.sdvp.run.STEPS).
Until = Literal["collect", "teacher", "sft", "tune", "eval"]
STEP_NAMES: tuple[str, ...] = get_args(Until)


class SdvpConfig(BaseModel):
    """Stepwise distillation (SDVP): distil a teacher into the tools' own VLM.

    A teacher answers every VLM step (simple_query, verify_property,
    best_text_match) of executed programs; the tools' VLM is tuned on those
    answers, so the same programs answer better.

    Steps: collect the sub-tasks from the traces; the teacher answers them
    (Teacher Input Adapter: the region drawn as a box on the image, the
    question naming the object); sft records for the student; vpd tune; the
    held-out programs run and are verified with the tools' VLM before, after,
    and with the teacher as the tool (report: OUT/sdvp.json). Re-running the
    same command resumes every step.

    Every option of `vpd sdvp` (also the `sdvp:` section of a recipe).
    """

    model_config = ConfigDict(extra="forbid")

    executions: Path = Field(description="Executions JSONL whose traces give the sub-tasks.")
    questions: Path = Field(description="Their questions JSONL (images).")
    teacher: str = Field(min_length=1, description="Teacher VLM: folder, hub id, or tiny.")
    out: Path = Field(description="Output folder (sdvp.json is the report).")
    student: str = Field(
        "tiny", min_length=1, description="The tools' VLM to distil into (tune's init)."
    )
    ops: list[str] = Field(
        default_factory=lambda: list(VLM_OPS),
        description="Tool ops to distil (comma list).",
        json_schema_extra={"cli": "text"},
    )
    view: Literal["pointer", "crop"] = Field(
        "pointer", description="What the teacher sees: pointer (box drawn) | crop."
    )
    rewrite: bool = Field(True, description="Visual pointer prompt: name the object (in the box).")
    ablation: bool = Field(False, description="Also distil with the other adapter (ablation).")
    tool_view: Literal["crop", "pointer"] = Field(
        "crop", description="What the tool shows its VLM."
    )
    holdout_types: list[str] = Field(
        default_factory=list,
        description="Question types left out (cross-task check), comma list.",
        json_schema_extra={"cli": "text"},
    )
    limit: int | None = Field(None, ge=1, description="Distil at most N sub-tasks.")
    batch_size: int = Field(8, ge=1, description="Teacher sub-tasks per batch.")
    max_new_tokens: int = Field(10, ge=1, description="Answer tokens.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the teacher and the tools' VLM run."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The VLMs' dtype (auto: bf16 where native, else float32)."
    )
    tune_recipe: Path | None = Field(None, description="vpd tune options YAML.")
    tune: dict[str, Any] = Field(
        default_factory=dict,
        description="Override a tune option: key=value (repeatable).",
        json_schema_extra={"cli": "key=value", "flag": "tune-set"},
    )
    eval_samples: Path | None = Field(None, description="Held-out programs JSONL.")
    eval_questions: Path | None = Field(None, description="Their questions JSONL.")
    backend: str = Field("synthetic", description="Tool backend for the evaluation runs.")
    tools: dict[str, Any] = Field(
        default_factory=dict,
        description="Other backend option KEY=VALUE (repeatable).",
        json_schema_extra={"cli": "key=value", "flag": "tool-opt"},
    )
    # Programs at once in the eval runs: their VLM calls reach the tool server together and
    # are answered in one batch, so more programs than cores keep the VLM's batches full.
    workers: int | None = Field(
        16, ge=1, description="Programs at once in the eval runs (their VLM calls batch together)."
    )
    timeout: float = Field(10.0, gt=0, description="Seconds per program in the eval runs.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of the intervals.")
    seed: int = Field(0, description="Seed of the bootstrap.")
    until: Until = Field("eval", description="Stop after this step.")
    # The teacher step split over machines: each answers its share of the sub-tasks (by id
    # hash) into <variant>/teacher.shard-I-of-N.jsonl; `vpd merge` joins them into
    # <variant>/teacher.jsonl, and a run without --shard goes on from there.
    shard: str | None = Field(
        None, description="Teacher step only: answer shard i/n of the sub-tasks (then vpd merge)."
    )
    force: bool = Field(False, description="Start a step over if it holds other options.")
    progress: bool = Field(True, description="Show progress bars and the result table.")

    @field_validator("teacher", "student", mode="before")
    @classmethod
    def _path_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("ops", "holdout_types", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("ops")
    @classmethod
    def _known_ops(cls, v: list[str]) -> list[str]:
        bad = [o for o in v if o not in VLM_OPS]
        if bad or not v:
            raise ValueError(f"ops must be some of {', '.join(VLM_OPS)}, got {v}")
        return sorted(set(v), key=VLM_OPS.index)

    @model_validator(mode="after")
    def _shard_only_teaches(self) -> SdvpConfig:
        if self.shard and self.until not in ("collect", "teacher"):
            raise ValueError(
                "--shard splits the teacher step only: run each shard with --until teacher, "
                "join them with vpd merge, then run without --shard"
            )
        return self

    @model_validator(mode="after")
    def _tune_options(self) -> SdvpConfig:
        # Typos in tune options fail here, before any teacher time is spent.
        taken = sorted({"init", "sft", "out"} & set(self.tune))
        if taken:
            raise ValueError(f"tune {', '.join(taken)} are set by sdvp itself (use --student)")
        load_tune_config(
            self.tune_recipe, None, **self.tune, sft=Path("sft.jsonl"), out=Path("student")
        )
        return self

    @field_validator("tools")
    @classmethod
    def _no_vqa(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"vqa", "vqa_ops", "vqa_view"} & set(v))
        if taken:
            raise ValueError(
                f"tool option(s) {taken} are set by sdvp itself (use --student, --ops, --tool-view)"
            )
        return v


@dataclass(frozen=True)
class Variant:
    """One Teacher Input Adapter setting, distilled into its own student."""

    view: str
    rewrite: bool

    @property
    def name(self) -> str:
        # pointer + prompt and crop as asked are the paper's two settings; others say so.
        if self.rewrite == (self.view == "pointer"):
            return self.view
        return f"{self.view}-{'named' if self.rewrite else 'asked'}"

    def describe(self) -> str:
        seen = "region drawn as a box on the image" if self.view == "pointer" else "region crop"
        asked = "question names the object" + (" in the box" if self.view == "pointer" else "")
        return f"{seen}; {asked if self.rewrite else 'question as the program asked it'}"


def variants(cfg: SdvpConfig) -> list[Variant]:
    main = Variant(cfg.view, cfg.rewrite)
    if not cfg.ablation:
        return [main]
    other = Variant("crop", False) if main.view == "pointer" else Variant("pointer", True)
    return [main, other]


@dataclass
class SdvpRun:
    """What the steps share as they run: each step reads what earlier ones made and adds its
    part to ``report`` (written as ``OUT/sdvp.json`` at the end)."""

    cfg: SdvpConfig
    report: dict[str, Any]
    teacher: str
    """The teacher model: as given, until the teacher step resolves it to a folder."""
    subtasks: list[SubTask] = field(default_factory=list)
    """Every sub-task collected (the collect step)."""
    distil: list[SubTask] = field(default_factory=list)
    """The ones distilled: not held out, at most ``cfg.limit``."""
