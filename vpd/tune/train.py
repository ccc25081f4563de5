"""``run_tune``: HF Trainer (+ DeepSpeed ZeRO-2/3/offload) fine-tuning of a VLM on SFT records.

Launch (every rank runs the same command; rank 0 writes logs, plots and the final model):
- one process: ``vpd tune SFT --out OUT [--deepspeed zero2]``; with ``--deepspeed`` the
  distributed env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are set here
  when absent, so DeepSpeed runs without a launcher, on GPU or on CPU (gloo);
- one node, N processes: ``torchrun --nproc_per_node N -m vpd.cli tune ...`` or
  ``deepspeed --no_local_rank --num_gpus N --module vpd.cli tune ...``;
- several nodes: ``deepspeed --no_local_rank --hostfile hosts --module vpd.cli tune ...``
  (hosts: one ``nodeX slots=8`` line per node, passwordless ssh) or, per node,
  ``torchrun --nnodes M --node_rank R --master_addr NODE0 --master_port 29500
  --nproc_per_node 8 -m vpd.cli tune ...``. SFT file, images and ``--init`` must be readable
  on every node; ``--out`` should be on a shared filesystem so a rerun resumes anywhere.

Output folder (``--out``): ``checkpoint-N/`` (Trainer checkpoints, newest ``save_total_limit``
kept), ``final/`` (standalone model + processor; LoRA merged), ``adapter/`` (LoRA runs),
``loss.jsonl`` + ``loss.png``, ``vpd_tune.json`` (config fingerprint), ``summary.json``
(written last: its presence with the same fingerprint means "done"), ``sft.rejects.jsonl``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import ConfigMismatch, VpdError
from vpd.hardware import train_dtype
from vpd.net import free_port
from vpd.progress import console, progress_bar, quiet_transformers
from vpd.store import (
    RejectWriter,
    atomic_write,
    atomic_write_json,
    config_diff,
    read_json,
    set_aside,
)
from vpd.tune import data as tdata
from vpd.tune.config import TrainOptions, TuneConfig, deepspeed_config_path, dump_json
from vpd.tune.loss import (
    IGNORE_INDEX,
    accepts_logits_to_keep,
    labelled_logits,
    weighted_rows_loss,
)
from vpd.tune.model import TINY, load_processor, resolve_model_dir, resolve_vlm
from vpd.tune.tiny import PALIGEMMA_CHAT_TEMPLATE

VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector")


# ----------------------------------------------------------------------------- environment


def ensure_dist_env() -> None:
    """Single-process DeepSpeed needs the variables a launcher would set; fill the gaps."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def set_deepspeed_accelerator() -> None:
    """Without CUDA, tell DeepSpeed (which transformers imports) that it runs on the CPU: it
    warns on stderr when it has to guess. Call before importing transformers' Trainer."""
    if not cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_deepspeed(spec: str, out: Path) -> str | None:
    """Path of the DeepSpeed JSON to use; on CPU an offload optimizer falls back to torch AdamW
    when DeepSpeed's CPU Adam op cannot be built (no compiler), written beside the run."""
    path = deepspeed_config_path(spec)
    if path is None:
        return None
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise VpdError(f"--deepspeed {path}: not valid JSON ({e})") from None
    if "optimizer" in conf and not _cpu_adam_ok():
        conf.pop("optimizer")
        conf["zero_force_ds_cpu_optimizer"] = False
        fallback = out / "ds_config.fallback.json"
        if rank() == 0:
            # Atomic: the other ranks read it as soon as it exists.
            atomic_write_json(fallback, conf, indent=2)

            console().print(
                "[yellow]DeepSpeed CPU Adam could not be built; using torch AdamW instead "
                f"(config: {fallback})"
            )
        else:
            _wait_for(fallback)
        return str(fallback)
    return str(path)


def _cpu_adam_ok() -> bool:
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
        return True
    except Exception:  # noqa: BLE001 - any build/import failure means "use the fallback"
        return False


def _wait_for(path: Path, timeout: float = 600.0) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise VpdError(f"rank {rank()}: timed out waiting for {path} from rank 0")
        time.sleep(0.2)


def join_cpu_deepspeed(ds_path: str | None) -> None:
    """After ``TrainingArguments``: on CPU, accelerate sets up plain gloo DDP and never tells
    DeepSpeed's comm layer, which then believes world_size == 1; hand it the process group."""
    if ds_path and not cuda_available():
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def training_arguments(
    opts: TrainOptions, out: Path, dtype: str, ds_path: str | None, has_val: bool
) -> Any:
    """HF ``TrainingArguments`` from the shared training options (one place for both
    trainers). Built before the model: under ZeRO-3 it arms zero.Init."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=opts.lr,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps if opts.max_steps > 0 else -1,
        lr_scheduler_type=opts.scheduler,
        warmup_steps=opts.warmup_ratio,  # < 1: a fraction of the total steps
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_grad_norm,
        logging_steps=opts.logging_steps,
        save_strategy="steps",
        save_steps=opts.save_steps,
        save_total_limit=opts.save_total_limit,
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        deepspeed=ds_path,
        report_to="none",
        remove_unused_columns=False,
        eval_strategy="epoch" if has_val else "no",
        per_device_eval_batch_size=opts.batch_size,
        dataloader_num_workers=opts.num_workers,
        disable_tqdm=True,
        use_cpu=not cuda_available(),
        activation_checkpointing=opts.gradient_checkpointing,
        ddp_find_unused_parameters=False,
    )


# ----------------------------------------------------------------------------- run state


def last_checkpoint(out: Path) -> Path | None:
    """Newest complete ``checkpoint-N`` (Trainer writes trainer_state.json last)."""
    best: tuple[int, Path] | None = None
    for p in out.glob("checkpoint-*"):
        try:
            step = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if (p / "trainer_state.json").exists() and (best is None or step > best[0]):
            best = (step, p)
    return best[1] if best else None


def prepare_out(
    out: Path, fp: dict[str, Any], opts: TrainOptions, meta_name: str = "vpd_tune.json"
) -> dict[str, Any] | None:
    """Apply the resume contract to a training folder (``fp``: the options that change the
    weights, kept in ``meta_name``); return the finished run's summary if there is nothing
    to do."""
    if out.exists() and not out.is_dir():
        raise VpdError(f"--out must be a folder, got a file: {out}")
    meta_file = out / meta_name
    old = read_json(meta_file)
    has_state = last_checkpoint(out) is not None or (out / "final").exists()
    if old is not None and old.get("config") != fp and has_state:
        if not opts.force:
            diff = config_diff(old.get("config") or {}, fp)
            raise ConfigMismatch(
                f"{out} holds a run with other options ({diff}); "
                "rerun with the same options to resume, use another --out, or --force to "
                "start over (the old folder is kept as .bak)"
            )
        if rank() == 0:
            set_aside(out)
        old = None
    summary = read_json(out / "summary.json")
    if summary is not None and summary.get("config") == fp and (out / "final").exists():
        return summary
    if not opts.resume and has_state and old is not None:
        if not opts.force:
            raise VpdError(
                f"{out} already holds checkpoints; drop --no-resume to continue them, "
                "or add --force to start over"
            )
        if rank() == 0:
            set_aside(out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(meta_file, dump_json({"config": fp}))
    else:
        t0 = time.time()
        while (read_json(meta_file) or {}).get("config") != fp:
            if time.time() - t0 > 120:
                raise VpdError(f"rank {rank()}: rank 0 did not prepare {out}")
            time.sleep(0.2)
    return None


# ----------------------------------------------------------------------------- model parts


def _top_modules(model: Any, names: tuple[str, ...], exclude: str | None = None) -> list[str]:
    """Outermost modules whose own name is one of ``names`` (e.g. ``model.vision_tower``)."""
    found: list[str] = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last not in names or (exclude and name.startswith(exclude + ".")):
            continue
        if not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def find_parts(model: Any) -> dict[str, list[str]]:
    """Module names of the vision tower, the projector and the language model (+ head)."""
    decoder = model.get_decoder()
    lm = [n for n, m in model.named_modules() if m is decoder][:1]
    for head in ("lm_head",):
        if any(n == head for n, _ in model.named_modules()):
            lm.append(head)
    vision = _top_modules(model, VISION_NAMES)
    projector = _top_modules(model, PROJECTOR_NAMES)
    if not lm:
        raise VpdError(f"cannot find the language model inside {type(model).__name__}")
    return {"vision": vision, "projector": projector, "lm": lm}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def setup_trainable(model: Any, cfg: TuneConfig) -> tuple[Any, dict[str, Any]]:
    """Freeze/LoRA-wrap the model per ``cfg``; return it and a description for the summary."""
    import torch

    parts = find_parts(model)
    frozen = set(cfg.frozen_parts())
    trainable = [p for p in ("vision", "projector", "lm") if p not in frozen and parts[p]]
    if not trainable:
        raise VpdError("--freeze leaves nothing to train")
    use_lora = cfg.lora and "lm" in trainable
    if use_lora:
        from peft import LoraConfig, get_peft_model

        targets = [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and name.rsplit(".", 1)[-1] in cfg.lora_targets
            and _under(name, parts["lm"][:1])
        ]
        if not targets:
            raise VpdError(
                f"no LoRA target layers ({', '.join(cfg.lora_targets)}) in the language model"
            )
        # Vision/projector train fully next to the adapters (the tiny model's start random).
        save: list[str] = []
        for part in ("vision", "projector"):
            if part in trainable:
                save += [n for n in parts[part] if not _under(n, save)]
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            modules_to_save=save or None,
            task_type=None,
        )
        model = get_peft_model(model, lcfg)
    else:
        keep = [n for p in trainable for n in parts[p]]
        for name, param in model.named_parameters():
            param.requires_grad = _under(name.rsplit(".", 1)[0], keep) or _under(name, keep)
    # ZeRO-3 leaves empty placeholders; ds_numel is the real size.
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return model, {
        "method": "lora" if use_lora else "full",
        "trained_parts": trainable,
        "trainable_params": n_train,
        "total_params": n_all,
    }


# ----------------------------------------------------------------------------- callbacks


def train_callbacks(out: Path, progress: bool, resume_step: int, label: str = "tune") -> list[Any]:
    """Trainer callbacks: the loss log (``out/loss.jsonl``, cut back to the checkpoint on
    resume) and vpd's progress bar (labelled ``label``) on rank 0."""
    from transformers import TrainerCallback

    loss_file = out / "loss.jsonl"

    class LossLog(TrainerCallback):
        """Appends every logged loss to loss.jsonl; on resume, cuts steps past the checkpoint
        so the file is one continuous curve."""

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if not state.is_world_process_zero or not loss_file.exists():
                return
            keep = [
                line
                for line in loss_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and _json_step(line) is not None and _json_step(line) <= resume_step
            ]
            # Rewritten whole: a kill here must not lose the rows before the resume step.
            atomic_write(loss_file, "".join(x + "\n" for x in keep))

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            # Training rows carry "loss"; the validation rows after each epoch "eval_loss".
            if not state.is_world_process_zero or not logs:
                return
            if "loss" not in logs and "eval_loss" not in logs:
                return
            rec = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "time": round(time.time(), 3),
            }
            keys = ("loss", "learning_rate", "grad_norm", "eval_loss")
            rec.update({k: logs[k] for k in keys if k in logs})
            with open(loss_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    class RichProgress(TrainerCallback):
        """A rich bar (steps, loss, rate, ETA) on rank 0, instead of Trainer's tqdm."""

        def __init__(self) -> None:
            self._ctx = None
            self._bar = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if not (state.is_world_process_zero and progress):
                return

            self._ctx = progress_bar(label, state.max_steps, "step", True)
            self._bar = self._ctx.__enter__()
            if state.global_step:
                self._bar.advance(state.global_step)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self._bar is not None:
                self._bar.advance()

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if self._bar is not None and logs and "loss" in logs:
                self._bar.describe(f"{label} loss {logs['loss']:.4f}", announce=False)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = self._bar = None

    return [LossLog(), RichProgress()]


def _json_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plot_loss(loss_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_loss_log(loss_file)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "eval_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="training")
    if val:
        ax.plot(
            [r["step"] for r in val],
            [r["eval_loss"] for r in val],
            marker="o",
            lw=1.5,
            label="validation (after each epoch)",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _init_path(cfg: TuneConfig) -> str:
    if cfg.init == TINY:
        return resolve_vlm(TINY, cfg.tiny_build, cfg.tiny_lm_layers)

    path = resolve_model_dir(cfg.init)
    p = Path(path)
    if p.exists() and not (p / "config.json").exists():
        raise VpdError(f"--init {cfg.init}: no config.json there (not a Hugging Face model)")
    if not p.exists() and (path.startswith((".", "/")) or path.count("/") != 1):
        raise VpdError(f"--init {cfg.init}: no such folder")
    return path


def _load_processor(path: str, cfg: TuneConfig) -> Any:
    with quiet_transformers():  # e.g. its "requires torchvision, falling back" notice
        processor = load_processor(path, cfg.trust_remote_code)
    if cfg.chat_template is not None:
        if not cfg.chat_template.is_file():
            raise VpdError(f"--chat-template {cfg.chat_template}: file not found")
        processor.chat_template = cfg.chat_template.read_text(encoding="utf-8")
    elif getattr(processor, "chat_template", None) is None and _model_type(path) == "paligemma":
        processor.chat_template = PALIGEMMA_CHAT_TEMPLATE
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return processor


@with_config(ConfigDict(extra="forbid"))
class TrainingReport(TypedDict, total=False):
    """What every fine-tuning run reports (`vpd tune`, `vpd tune-writer`): where its model
    is, what trained, its data's size and the optimisation's course and speed."""

    out: str
    final: str
    init: str
    method: str
    trainable_params: int
    deepspeed: str
    world_size: int
    dropped_too_long: int
    examples: int
    mean_tokens: float
    max_tokens: int
    steps: int
    resumed_from_step: int
    train_loss: float | None
    final_loss: float | None
    train_s: float
    wall_s: float
    examples_per_s: float | None
    skipped: bool


@with_config(ConfigDict(extra="forbid"))
class TuneSummary(TrainingReport, total=False):
    """What `vpd tune` returns (rank 0; also OUT/summary.json, less its config).

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    trained_parts: list[str]
    total_params: int
    records: int
    rejected: int
    truncated: int
    per_task: dict[str, int]
    val_loss: list[Any]


def run_tune(cfg: TuneConfig) -> TuneSummary:
    """Fine-tune ``cfg.init`` on ``cfg.sft`` into ``cfg.out`` (resumable); return a summary."""
    t0 = time.time()
    if not Path(cfg.sft).is_file():
        raise VpdError(f"SFT file not found: {cfg.sft}")
    if cfg.deepspeed != "none":
        deepspeed_config_path(cfg.deepspeed)  # fail fast on a bad name/path
        ensure_dist_env()
    fp = cfg.fingerprint_fields()
    done = prepare_out(cfg.out, fp, cfg)
    if done is not None:
        return {**{k: v for k, v in done.items() if k != "config"}, "skipped": True}

    import torch

    out = cfg.out
    set_deepspeed_accelerator()
    from transformers import AutoModelForImageTextToText, Trainer, set_seed

    dtype = train_dtype(cfg.dtype)
    ds_path = resolve_deepspeed(cfg.deepspeed, out)
    init_path = _init_path(cfg)
    processor = _load_processor(init_path, cfg)

    # TrainingArguments before the model: under ZeRO-3 it arms zero.Init so from_pretrained
    # loads weights already partitioned across ranks.
    args = training_arguments(cfg, out, dtype, ds_path, cfg.val is not None)
    join_cpu_deepspeed(ds_path)
    prep = {
        "processor": processor,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "seed": cfg.seed,
        "turns_per_image": cfg.turns_per_image,
        "model_type": _model_type(init_path),
        "layout": cfg.layout,
        "progress": cfg.progress and rank() == 0,
    }
    with RejectWriter(out / "sft.rejects.jsonl") if rank() == 0 else _Null() as rejects:
        dataset, stats = tdata.prepare(
            Path(cfg.sft),
            task_weights=cfg.task_weights,
            rejects=rejects if rank() == 0 else None,
            **prep,
        )
    val_set = None
    if cfg.val is not None:
        # The answer task alone: the one both arms share, and the one evaluated.
        with RejectWriter(out / "val.rejects.jsonl") if rank() == 0 else _Null() as rejects:
            val_set, _ = tdata.prepare(
                Path(cfg.val),
                task_weights={"rationale": 0.0} if cfg.layout == "question" else {"answer": 1.0},
                rejects=rejects if rank() == 0 else None,
                **{**prep, "turns_per_image": 1},
            )
    # Seed before the model exists: LoRA's A matrices (and any new heads) are drawn at wrap
    # time, before Trainer would seed, and two runs of one command must start identical.
    set_seed(cfg.seed)
    # Weights load in fp32; bf16/fp16 come from autocast (or DeepSpeed), the usual recipe.
    with quiet_transformers():  # its loading bar and deprecation notices; vpd shows its own
        model = AutoModelForImageTextToText.from_pretrained(
            init_path, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model, trainable = setup_trainable(model, cfg)

    ckpt = last_checkpoint(out) if cfg.resume else None
    resume_step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
    if cfg.layout == "question":
        base = question_trainer(Trainer)
        collator = tdata.TaskCollator(processor_pad_id(processor), cfg.task_weights)
    else:
        base = sparse_logits_trainer(Trainer) if cfg.sparse_logits else Trainer
        collator = tdata.Collator(processor_pad_id(processor))
    trainer = (length_grouped_trainer(base) if cfg.group_by_length else base)(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=val_set,
        data_collator=collator,
        callbacks=train_callbacks(cfg.out, cfg.progress, resume_step),
    )
    drop_tqdm_printer(trainer)
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    train_s = time.time() - t_train

    final = out / "final"
    if trainable["method"] == "lora":
        trainer.save_model(str(out / "adapter"))  # gathers ZeRO-3 shards on rank 0
    else:
        trainer.save_model(str(final))
    trainer.accelerator.wait_for_everyone()
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        if trainable["method"] == "lora":
            if cfg.merge:
                merge_lora(
                    AutoModelForImageTextToText, init_path, out / "adapter", final,
                    cfg.trust_remote_code,
                )  # fmt: skip
            else:
                shutil.copytree(out / "adapter", final, dirs_exist_ok=True)
        with quiet_transformers():
            processor.save_pretrained(str(final))
        if (out / "loss.jsonl").exists():
            plot_loss(out / "loss.jsonl", out / "loss.png")
        steps = trainer.state.global_step
        examples_seen = (steps - resume_step) * cfg.batch_size * cfg.grad_accum * args.world_size
        run_s = max(time.time() - t0, 1e-9)
        summary = {
            "out": str(out),
            "final": str(final),
            "init": cfg.init if cfg.init != "tiny" else f"tiny ({init_path})",
            **trainable,
            "deepspeed": cfg.deepspeed,
            "world_size": args.world_size,
            "records": stats.records,
            "rejected": stats.rejected,
            "dropped_too_long": stats.dropped_too_long,
            "truncated": stats.truncated,
            "examples": stats.examples,
            "per_task": stats.per_task,
            "mean_tokens": stats.mean_tokens,
            "max_tokens": stats.max_tokens,
            "steps": steps,
            "resumed_from_step": resume_step,
            "train_loss": round(float(result.training_loss), 4),
            "final_loss": last_loss(out / "loss.jsonl"),
            "val_loss": val_losses(out / "loss.jsonl"),
            "train_s": round(train_s, 1),  # the optimisation loop alone
            "wall_s": round(run_s, 1),  # + data screening, loading, saving, merging
            "examples_per_s": round(examples_seen / max(train_s, 1e-9), 2),
            "skipped": False,
        }
        atomic_write(out / "summary.json", dump_json({**summary, "config": fp}))
    trainer.accelerator.wait_for_everyone()
    return summary


def sparse_logits_trainer(base: Any) -> Any:
    """HF Trainer (``records`` layout) whose loss projects onto the vocabulary only where a
    label is.

    A VLM example is mostly prompt and image tokens (label -100), yet the model computes
    logits over its whole vocabulary (49k rows for SmolLM2) at every position; the
    language-model head is then a large share of a CPU step. Passing ``logits_to_keep``
    (the positions whose next token is labelled, in any row of the batch) computes the same
    loss, the mean cross-entropy over labelled tokens, from those positions alone.
    """
    import torch.nn.functional as F

    class SparseLogitsTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            labels = inputs.get("labels")
            if labels is None or not accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            logits, target, outputs = labelled_logits(model, inputs, labels)
            total = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # As the model's own loss: normalized over the accumulated batch's tokens.
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            else:
                loss = total / (target != IGNORE_INDEX).sum().clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    return SparseLogitsTrainer


def question_trainer(base: Any) -> Any:
    """HF Trainer for the ``question`` layout (VPD's objective, :mod:`vpd.tune.loss`): each
    batch is ``{task: padded sequences + row_weight}``; the loss is the sum over tasks of
    the row-weighted per-sequence mean cross-entropies, i.e. the mean over the batch's
    examples of ``sum_t w_t * L_t``. Trainer divides it by the accumulation steps."""

    class QuestionTrainer(base):
        # Our loss is a per-example mean, not a token sum over the accumulated batch.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202, ARG002
            total = None
            outputs = None
            for group in inputs.values():
                feats = {k: v for k, v in group.items() if k not in ("labels", "row_weight")}
                logits, target, outputs = labelled_logits(model, feats, group["labels"])
                term = weighted_rows_loss(logits, target, group["row_weight"])
                total = term if total is None else total + term
            return (total, outputs) if return_outputs else total

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # noqa: ANN001, ANN202, ARG002
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return QuestionTrainer


def length_grouped_trainer(base: Any) -> Any:
    """HF Trainer whose batches hold examples of similar length (transformers'
    ``LengthGroupedSampler``: random mega-batches, sorted inside), with the lengths known
    from screening (``SftDataset.lengths``) instead of a second encoding pass over the data.
    Each epoch's order is drawn from ``seed + epoch``, so a resumed run replays it exactly."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededSampler(LengthGroupedSampler):
        def __init__(self, batch: int, lengths: list[int], seed: int) -> None:
            super().__init__(batch, lengths=lengths, generator=torch.Generator())
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator.manual_seed(self.seed + int(epoch))

    class LengthGroupedTrainer(base):
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = getattr(dataset, "lengths", None)
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            return EpochSeededSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths,
                self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            )

    return LengthGroupedTrainer


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def processor_pad_id(processor: Any) -> int:
    tok = getattr(processor, "tokenizer", processor)
    return int(tok.pad_token_id)


def _model_type(path: str) -> str:
    cfg = read_json(Path(path) / "config.json") or {}
    return str(cfg.get("model_type", ""))


def read_loss_log(loss_file: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``loss.jsonl`` (training rows carry ``loss``, validation rows
    ``eval_loss``); a torn or foreign line is skipped."""
    if not Path(loss_file).exists():
        return []
    rows = []
    for line in Path(loss_file).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def val_losses(loss_file: Path) -> list[dict[str, float]]:
    """``[{"epoch", "step", "loss"}]``: the validation loss after each epoch."""
    return [
        {"epoch": round(r["epoch"], 2), "step": r["step"], "loss": round(r["eval_loss"], 4)}
        for r in read_loss_log(loss_file)
        if "eval_loss" in r
    ]


def last_loss(loss_file: Path) -> float | None:
    """The last training loss logged (None: none yet)."""
    train = [r for r in read_loss_log(loss_file) if "loss" in r]
    return round(float(train[-1]["loss"]), 4) if train else None


def drop_tqdm_printer(trainer: Any) -> None:
    # With tqdm disabled Trainer prints each log dict to stdout; our bar and loss.jsonl
    # carry the same numbers, and stdout stays clean for the JSON summary.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def merge_lora(
    auto_cls: Any, init_path: str, adapter: Path, final: Path, trust_remote_code: bool = False
) -> None:
    """Reload the base (``auto_cls``: the transformers Auto class it loads with) in fp32,
    apply the saved adapter, merge, and save a standalone model any loader reads."""
    import torch
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over: on rank 0 alone the base must load whole, not through ZeRO-3's
    # partitioned init (whose collectives would wait forever for the other ranks).
    unset_hf_deepspeed_config()
    with quiet_transformers():
        base = auto_cls.from_pretrained(
            init_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(str(final))
