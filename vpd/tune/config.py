"""``TuneConfig``: every option of ``vpd tune``, and recipe (YAML) loading with overrides.

Precedence: model defaults < recipe YAML (``tune:`` section or top level) < ``--set k=v``
< explicit CLI flags.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vpd.errors import VpdError
from vpd.hardware import train_dtype
from vpd.options import progress_field, split_option
from vpd.resources import find_recipe, recipes_dir
from vpd.tune.data import parse_task_weights
from vpd.tune.model import TinyBuild

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
PARTS = ("vision", "projector", "lm")
RECIPES_DIR = recipes_dir()  # the DeepSpeed presets ship with the package


class TrainOptions(BaseModel):
    """The options of one fine-tuning run that are not about its data or model: the
    optimisation, what trains (LoRA or full), DeepSpeed, checkpoints. `vpd tune` (the VLM)
    and `vpd tune-writer` (the program writer) both take them, through one trainer setup
    (:func:`vpd.tune.train.training_arguments`)."""

    model_config = ConfigDict(extra="forbid")

    # optimisation
    epochs: float = Field(1.0, gt=0, description="Training epochs.")
    max_steps: int = Field(-1, description="Stop after N optimizer steps (> 0 overrides --epochs).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Share of the steps spent warming up the learning rate."
    )
    scheduler: str = Field(
        "cosine",
        description=("Learning-rate schedule (transformers' names: cosine, linear, constant...)."),
    )
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed (data order, LoRA init, tiny model).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="Training dtype (auto: bf16 where native: GPU, AMX or AVX512-BF16 CPU)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory)."
    )
    # Vocabulary logits only where a label is (same loss, less compute); off: the model's own
    sparse_logits: bool = Field(
        True, description="Vocabulary logits only where a label is (same loss, less compute)."
    )
    # what trains
    lora: bool = Field(
        True,
        description="LoRA adapters on the LM, or full fine-tuning.",
        json_schema_extra={"flag": "lora/--full"},
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        description="Module names LoRA adapts (repeatable).",
    )
    # scale-out
    deepspeed: str = Field("none", description="none|zero2|zero3|zero3_offload|PATH.json.")
    # checkpoints / outputs
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    logging_steps: int = Field(1, ge=1, description="Log the loss every N steps.")
    merge: bool = Field(True, description="Merge LoRA into OUT/final.")
    resume: bool = Field(True, description="Continue OUT's checkpoint.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    force: bool = Field(False, description="Start over if OUT holds a run with other options.")
    progress: bool = progress_field()

    def weight_options(self, *skip: str) -> dict[str, Any]:
        """The options that change the trained weights, for a run's fingerprint: not its
        output folder, progress, resume or checkpoint switches, nor ``skip`` (the fields a
        caller fingerprints by content instead); DeepSpeed only as on or off (its ZeRO stage
        does not change the maths, so a run may resume under another)."""
        drop = {"out", "resume", "force", "progress", "num_workers", "save_total_limit"}
        drop |= {"sparse_logits", *skip}  # the same loss, computed cheaper
        d = {k: v for k, v in self.model_dump(mode="json").items() if k not in drop}
        d["deepspeed"] = "none" if self.deepspeed == "none" else "deepspeed"
        # What the weights are trained in: ``auto`` differs by machine, and an old run's
        # explicit bfloat16 equals ``auto`` where bf16 is native.
        d["dtype"] = train_dtype(self.dtype, quiet=True)
        return d

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _csv_targets(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v


class TuneConfig(TrainOptions):
    """Fine-tune a VLM on SFT records (HF Trainer, optional DeepSpeed ZeRO, LoRA or full).

    Re-running the same command resumes from the last checkpoint, or does nothing when the
    run is finished. Flags override --recipe values (and --set key=value).

    Options of one fine-tuning run (paths, data, optimisation, LoRA, DeepSpeed, I/O).
    """

    model_config = ConfigDict(extra="forbid")

    sft: Path = Field(description="SFT JSONL (vpd rationalize output).")
    out: Path = Field(description="Output folder; the model lands in OUT/final.")
    init: str = Field("tiny", description="tiny (embedded default) or a HF VLM folder/hub id.")
    # init=tiny only: keep the first N of SmolLM2's 30 layers (None: all). For smoke tests:
    # the cut LM is broken (12 layers: next-token loss 24 vs 4.4) until tuning repairs it.
    tiny_lm_layers: int | None = Field(
        None,
        ge=1,
        le=30,
        description="init=tiny: keep the first N of SmolLM2's 30 layers (smoke tests only).",
    )
    tiny_build: TinyBuild = Field(
        default_factory=TinyBuild,
        description="init=tiny: the recipes of its build stages.",
        json_schema_extra={"cli": False},
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template for processors that ship none."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model folder/hub."
    )
    # Validation SFT (answer records of held-out training images): its loss after every
    # epoch goes to loss.jsonl/loss.png, to choose epochs and learning rate on it.
    val: Path | None = Field(
        None,
        description=(
            "Validation SFT JSONL: its loss after every epoch goes to loss.jsonl/loss.png."
        ),
    )
    # data
    max_length: int = Field(512, ge=16, description="Max tokens per example.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="What happens to examples over --max-length."
    )
    # question: one example per question, its tasks' losses each averaged over its own
    # tokens and summed (VPD's objective); records: one example per SFT record.
    layout: Literal["question", "records"] = Field(
        "question",
        description=(
            "question: one example per question with its tasks (VPD's loss); "
            "records: one per SFT record."
        ),
    )
    # question layout: each task's loss weight (rationale=0: the labels arm); records
    # layout: how often each task's records are repeated/sub-sampled.
    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Each task's loss weight, e.g. answer=1,rationale=1.",
        json_schema_extra={"cli": "text"},
    )
    # Batches of examples of similar length (short answers apart from long rationales):
    # far less padding per step; LLaVA's recipes do the same (group_by_modality_length).
    group_by_length: bool = Field(
        True, description="Batch examples of similar length (less padding)."
    )
    # Up to N single-turn answer examples of one image joined into one multi-turn
    # conversation (LLaVA's data layout): the image is encoded once for N questions.
    turns_per_image: int = Field(
        1,
        ge=1,
        description=("Join up to N answer examples of one image into one multi-turn conversation."),
    )
    # None: auto = the vision tower (pretrained, as in LLaVA's stage 2; the tiny VLM's too)
    freeze: list[str] | None = Field(
        None,
        description="Comma list of vision,projector,lm to keep frozen.",
        json_schema_extra={"cli": "text"},
    )

    @field_validator("freeze")
    @classmethod
    def _parts(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [p for p in v if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
        return sorted(set(v))

    @field_validator("task_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        return parse_task_weights(v)

    @field_validator("freeze", mode="before")
    @classmethod
    def _csv(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    def frozen_parts(self) -> list[str]:
        if self.freeze is not None:
            return self.freeze
        return ["vision"]

    def fingerprint_fields(self) -> dict[str, Any]:
        """Options that change the trained weights (not I/O, progress or resume switches)."""
        d = self.weight_options()
        d["freeze"] = self.frozen_parts()
        d["sft"] = _file_identity(self.sft)
        if self.chat_template is not None:
            d["chat_template"] = _file_identity(self.chat_template)
        if self.val is not None:
            d["val"] = _file_identity(self.val)
        return d


def _file_identity(path: Path) -> dict[str, Any]:
    """Name + size + a hash of the head and tail: cheap, and changes when the data does."""
    p = Path(path)
    if not p.exists():
        return {"path": str(p)}
    h = hashlib.sha256()
    size = p.stat().st_size
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            h.update(f.read())
    return {"name": p.name, "size": size, "sha256": h.hexdigest()[:16]}


def deepspeed_config_path(spec: str) -> Path | None:
    """``none`` -> None; a preset name -> recipes/ds_<name>.json; else the given JSON path."""
    if spec in ("", "none", None):
        return None
    if spec in DEEPSPEED_PRESETS:
        path = RECIPES_DIR / f"ds_{spec}.json"
    else:
        path = Path(spec)
    if not path.is_file():
        raise VpdError(
            f"--deepspeed {spec}: config not found at {path} "
            f"(use none, {', '.join(DEEPSPEED_PRESETS)} or a JSON file)"
        )
    return path


def load_tune_config(
    recipe: Path | None = None,
    sets: list[str] | None = None,
    **flags: Any,
) -> TuneConfig:
    """Merge recipe YAML, ``--set key=value`` pairs and explicit flags (None = not given)."""
    values: dict[str, Any] = {}
    if recipe is not None:
        recipe = find_recipe(recipe)
        if not recipe.is_file():
            raise VpdError(f"recipe not found: {recipe}")
        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise VpdError(f"recipe {recipe} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise VpdError(f"recipe {recipe} must be a mapping of option -> value")
        if isinstance(data.get("tune"), dict):  # a whole-pipeline recipe: take its tune part
            data = data["tune"]
        values.update(data)
    for item in sets or []:
        key, value = split_option(item, "--set")
        key = key.removeprefix("tune.")
        if not key:
            raise VpdError(f"--set expects key=value, got {item!r}")
        values[key.replace("-", "_")] = value
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return TuneConfig(**values)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
        raise VpdError("invalid tune options: " + "; ".join(parts)) from None


def dump_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, default=str)
