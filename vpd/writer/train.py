"""``vpd tune-writer``: tune the program-writing LLM on its own verified programs.

One round of expert iteration (STaR, ReST): the kept programs of training questions
(:mod:`vpd.writer.data`) are the targets, the sampler's own chat (prompt template, shots,
chat template) the context, and only the program's tokens are scored. The model is any
Hugging Face causal LM (default: SmolLM2-135M-Instruct, shipped), tuned with LoRA or fully
through the trainer setup `vpd tune` uses (HF Trainer, DeepSpeed ZeRO on CPU or GPU, same
launchers). ``OUT/final`` is a standalone model (LoRA merged) with its tokenizer and chat
template: ``vpd sample --model OUT/final`` loads it on vpd's engine.

Output folder: ``data.jsonl`` (the examples, for inspection), ``checkpoint-N/``,
``adapter/`` (LoRA), ``final/``, ``loss.jsonl`` + ``loss.png``, ``vpd_writer.json`` (the
fingerprint), ``summary.json`` (written last: done). Re-running resumes from the last
checkpoint or does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, with_config

from vpd.errors import VpdError
from vpd.hardware import train_dtype
from vpd.llm.local import flat_content, smollm2_dir
from vpd.progress import quiet_transformers
from vpd.store import atomic_write
from vpd.tune.config import TrainOptions, deepspeed_config_path, dump_json
from vpd.tune.data import Collator
from vpd.tune.loss import IGNORE_INDEX
from vpd.tune.train import (
    TrainingReport,
    drop_tqdm_printer,
    ensure_dist_env,
    join_cpu_deepspeed,
    last_checkpoint,
    last_loss,
    length_grouped_trainer,
    merge_lora,
    plot_loss,
    prepare_out,
    rank,
    resolve_deepspeed,
    set_deepspeed_accelerator,
    sparse_logits_trainer,
    train_callbacks,
    training_arguments,
)
from vpd.writer.data import WriterData, build_examples

META = "vpd_writer.json"


class WriterConfig(TrainOptions):
    """Tune the program writer on the programs the verifier kept (expert iteration).

    Training examples are the sampler's prompt for a training question (--prompt, --shots,
    the model's chat template) and one kept program; only the program's tokens are scored.
    Verified records of a question outside --questions, or of one in an --exclude split, are
    an error. OUT/final loads in `vpd sample --model OUT/final --prompt P --shots N` (use
    the same prompt and shots). Re-running resumes or does nothing.
    """

    model_config = ConfigDict(extra="forbid")

    verified: list[Path] = Field(
        description="Verified JSONL (vpd verify; repeatable): their kept programs train it."
    )
    questions: Path = Field(description="The training split's questions (the programs' questions).")
    out: Path = Field(description="Output folder; the tuned writer lands in OUT/final.")
    exclude: list[Path] = Field(
        default_factory=list,
        description="Question files (test, validation) that must never reach the writer.",
    )
    init: str | None = Field(
        None, description="Writer to tune: a HF causal-LM folder (default SmolLM2-135M-Instruct)."
    )
    prompt: str = Field(
        "viper/writer", description="Prompt template of the tuned writer (prompts/<family>/<v>)."
    )
    shots: int = Field(0, ge=0, description="Few-shot examples in its prompt.")
    per_question: int = Field(4, ge=1, description="At most N distinct kept programs per question.")
    max_length: int = Field(1024, ge=16, description="Longer examples are dropped.")
    # The writer's measured defaults (docs/experiments.md, "writer"): a few hundred short
    # examples want a larger rate than the VLM's 1e-4, and dropout costs a quarter of a CPU
    # step (bench/bench_tune.py).
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    epochs: float = Field(2.0, gt=0, description="Training epochs.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")

    def fingerprint_fields(self, data_sha: str) -> dict[str, Any]:
        """What changes the tuned weights: the options and the examples' content (which the
        input files are left out for)."""
        return {**self.weight_options("verified", "questions", "exclude"), "data": data_sha}


@with_config(ConfigDict(extra="forbid"))
class WriterSummary(TrainingReport, total=False):
    """What `vpd tune-writer` returns (rank 0; also OUT/summary.json, less its config): the
    training report and how the examples were drawn from the verified records."""

    verified: int
    kept: int
    duplicates: int
    over_cap: int
    questions: int


class WriterDataset:
    """Token ids with the prompt masked; ``lengths`` for length-grouped batches."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.lengths = [len(r["input_ids"]) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def encode_example(tok: Any, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt as the sampler renders and tokenizes it (chat template
    with the generation prompt, no special tokens added), then the assistant's turn as the
    template ends it; labels are -100 over the prompt."""
    msgs = flat_content(messages)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise VpdError("the chat template renders a conversation unlike its prompt: cannot mask")
    answer = full[len(prompt) :].rstrip("\n")  # the turn's end token, not the newline after
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [IGNORE_INDEX] * len(p_ids) + a_ids


def _init_path(init: str | None) -> str:
    if init is None:
        return str(smollm2_dir())
    p = Path(init).expanduser()
    if not (p / "config.json").is_file():
        raise VpdError(f"--init {init}: not a Hugging Face model folder (no config.json)")
    return str(p)


def _data_sha(data: WriterData) -> str:
    """What the examples teach (question and chat, in order), not where they were read:
    a run directory copied elsewhere keeps its tuned writers."""
    h = hashlib.sha256()
    for ex in data.examples:
        h.update(json.dumps([ex.qid, ex.messages], sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:16]


def run_writer(cfg: WriterConfig) -> WriterSummary:
    """Tune the writer on the kept programs into ``cfg.out`` (resumable); return a summary."""
    t0 = time.time()
    if cfg.deepspeed != "none":
        deepspeed_config_path(cfg.deepspeed)  # fail fast on a bad name/path
        ensure_dist_env()
    data = build_examples(
        cfg.verified, cfg.questions, cfg.exclude, cfg.prompt, cfg.shots, cfg.per_question
    )
    if not data.examples:
        raise VpdError(
            f"no kept program in {', '.join(map(str, cfg.verified))}: nothing to tune the writer on"
        )
    fp = cfg.fingerprint_fields(_data_sha(data))
    done = prepare_out(cfg.out, fp, cfg, META)
    if done is not None:
        return {**{k: v for k, v in done.items() if k != "config"}, "skipped": True}
    out = cfg.out
    if rank() == 0:
        atomic_write(out / "data.jsonl", "".join(e.model_dump_json() + "\n" for e in data.examples))

    import torch

    set_deepspeed_accelerator()
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed

    dtype = train_dtype(cfg.dtype)
    ds_path = resolve_deepspeed(cfg.deepspeed, out)
    init_path = _init_path(cfg.init)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(init_path)
    if tok.chat_template is None:
        raise VpdError(f"{init_path} has no chat template; the writer is an instruct model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows, dropped = [], 0
    for ex in data.examples:
        ids, labels = encode_example(tok, ex.messages)
        if len(ids) > cfg.max_length:
            dropped += 1
            continue
        rows.append(
            {
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(labels),
            }
        )
    if not rows:
        raise VpdError(f"every example is longer than --max-length {cfg.max_length}")
    dataset = WriterDataset(rows)
    args = training_arguments(cfg, out, dtype, ds_path, has_val=False)
    join_cpu_deepspeed(ds_path)
    set_seed(cfg.seed)  # LoRA's A matrices are drawn at wrap time
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(init_path, dtype=torch.float32)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            task_type="CAUSAL_LM",
        )
        with quiet_transformers():  # peft's deprecation notices about transformers' API
            model = get_peft_model(model, lcfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt = last_checkpoint(out) if cfg.resume else None
    resume_step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
    base = sparse_logits_trainer(Trainer) if cfg.sparse_logits else Trainer
    trainer = length_grouped_trainer(base)(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(int(tok.pad_token_id)),
        callbacks=train_callbacks(out, cfg.progress, resume_step, label="tune-writer"),
    )
    drop_tqdm_printer(trainer)
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_s = time.time() - t_train
    final = out / "final"
    with quiet_transformers():  # its "Writing model shards" bar
        trainer.save_model(str(out / "adapter" if cfg.lora else final))
    trainer.accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        if cfg.lora and cfg.merge:
            merge_lora(AutoModelForCausalLM, init_path, out / "adapter", final)
        elif cfg.lora:
            shutil.copytree(out / "adapter", final, dirs_exist_ok=True)
        tok.padding_side = "left"  # as the sampler batches
        tok.save_pretrained(str(final))
        if (out / "loss.jsonl").exists():
            plot_loss(out / "loss.jsonl", out / "loss.png")
        steps = trainer.state.global_step
        seen = (steps - resume_step) * cfg.batch_size * cfg.grad_accum * args.world_size
        summary = {
            "out": str(out),
            "final": str(final),
            "init": cfg.init or "SmolLM2-135M-Instruct",
            "method": "lora" if cfg.lora else "full",
            "trainable_params": n_train,
            "deepspeed": cfg.deepspeed,
            "world_size": args.world_size,
            "verified": data.verified,
            "kept": data.kept,
            "duplicates": data.duplicates,
            "over_cap": data.over_cap,
            "questions": data.questions,
            "examples": len(rows),
            "dropped_too_long": dropped,
            "mean_tokens": round(sum(dataset.lengths) / len(rows), 1),
            "max_tokens": max(dataset.lengths),
            "steps": steps,
            "resumed_from_step": resume_step,
            "train_loss": round(float(result.training_loss), 4),
            "final_loss": last_loss(out / "loss.jsonl"),
            "train_s": round(train_s, 1),
            "wall_s": round(time.time() - t0, 1),
            "examples_per_s": round(seen / max(train_s, 1e-9), 2),
            "skipped": False,
        }
        atomic_write(out / "summary.json", dump_json({**summary, "config": fp}))
    trainer.accelerator.wait_for_everyone()
    return summary  # type: ignore[return-value]


def summary_line(cfg: WriterConfig, s: WriterSummary) -> str:
    """The one line `vpd tune-writer` prints."""
    if s.get("skipped"):
        return f"tune-writer: {cfg.out} is done (nothing to do)"
    return (
        f"tune-writer: {s.get('examples')} programs of {s.get('questions')} questions, "
        f"{s.get('steps')} steps, loss {s.get('final_loss')}, {s.get('train_s')}s -> "
        f"{s.get('final')}"
    )


__all__ = ["WriterConfig", "WriterSummary", "run_writer", "summary_line"]
