"""`vpd` command line: one thin sub-command per pipeline stage.

Logic lives in the stage modules; this file only turns flags into a call. User
errors (``VpdError``) print as one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from vpd.data.importer import ImportConfig, run_import
from vpd.data.importer import summary_line as import_line
from vpd.data.synth import SynthConfig, run_synth
from vpd.data.synth import summary_line as synth_line
from vpd.errors import VpdError
from vpd.evaluate import EvalConfig, run_eval
from vpd.evaluate import summary_line as eval_line
from vpd.execute.runner import ExecuteConfig, run_execute
from vpd.execute.runner import summary_line as execute_line
from vpd.export import ExportConfig, run_export
from vpd.export import summary_line as export_line
from vpd.flags import (
    Group,
    config_command,
    option,
    os_error_line,
    stage_command,
    validation_line,
)
from vpd.llm.config import LLMConfig
from vpd.llm.serve import ServeConfig, run_serve, serve_line
from vpd.pipeline import RunConfig, run_command
from vpd.rationalize import RationalizeConfig, run_rationalize
from vpd.rationalize import summary_line as rationalize_line
from vpd.report import ReportConfig, StatusConfig, report_line, run_report, run_status, status_line
from vpd.sample.runner import SampleConfig, run_sample
from vpd.sample.runner import summary_line as sample_line
from vpd.sdvp import SdvpConfig, run_sdvp
from vpd.sdvp.report import summary_line as sdvp_line
from vpd.store import MergeConfig, merge_line, run_merge
from vpd.tune.config import TuneConfig
from vpd.verify import VerifyConfig, run_verify
from vpd.verify import summary_line as verify_line
from vpd.view.command import ViewConfig, run_view
from vpd.view.command import summary_line as view_line
from vpd.writer import WriterConfig, run_writer
from vpd.writer import summary_line as writer_line

app = typer.Typer(
    help=(
        "Visual Program Distillation: LLM-written programs over vision tools, "
        "distilled into a VLM.\n\n"
        "Pipeline: data -> sample -> execute -> verify (-> tune-writer: the writer learns "
        "from its kept programs, and round again) -> rationalize -> tune -> eval "
        "(-> sdvp: distil a teacher into the tools). "
        "Every stage reads and writes JSONL, and resumes where it stopped when run again."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make or import question sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(msg: str) -> None:
    raise VpdError(msg)


# ----------------------------------------------------------------------------- run / status


@stage_command(app, "run", RunConfig, run_command, lambda cfg, markers: "", args=("recipe",))
def run(options: dict[str, Any]) -> None:
    """Example:

    vpd run recipes/demo-cpu.yaml --run-dir runs/demo

    vpd run recipes/demo-cpu.yaml --set sample.k=3 --set tune.max_steps=50 --force

    vpd run recipes/ablation-cpu.yaml --run-dir runs/ablation   # every arm of the ablation
    """


@stage_command(app, "status", StatusConfig, run_status, status_line, args=("run_dir",))
def status(options: dict[str, Any]) -> None:
    """Example:

    vpd status runs/demo-cpu
    """


# ----------------------------------------------------------------------------- data


@stage_command(data_app, "synth", SynthConfig, run_synth, synth_line)
def data_synth(options: dict[str, Any]) -> None:
    """Example:

    vpd data synth --out data/synth --n 1000 --seed 0 --test-frac 0.2
    """


@stage_command(data_app, "import", ImportConfig, run_import, import_line, args=("input",))
def data_import(options: dict[str, Any]) -> None:
    """Example:

    vpd data import gqa/testdev_balanced_questions.json --format gqa
      --image-root gqa/images --out data/gqa/test.jsonl

    vpd data import v2_OpenEnded_mscoco_val2014_questions.json --format vqav2
      --annotations v2_mscoco_val2014_annotations.json --image-root coco/val2014
      --out data/vqav2/val.jsonl

    vpd data import aokvqa_v1p0_val.json --format aokvqa --setting mc
      --image-root coco --out data/aokvqa/val_mc.jsonl

    vpd data import nlvr2/data/dev.json --format nlvr2 --image-root nlvr2/images
      --out data/nlvr2/dev.jsonl

    vpd data import vqa.jsonl --out data/vqa/train.jsonl --image-root /data/coco

    vpd data import ./gqa_saved --hf-split validation --out data/gqa/test.jsonl
      --question-field question --answers-field answer
    """


# ----------------------------------------------------------------------------- verify / rationalize


# The LLM flags of the commands whose LLM is optional (verify's judge, rationalize's llm mode).
JUDGE = Group(LLMConfig, "llm", only=("backend", "model", "base_urls", "api_key"))


@stage_command(
    app, "verify", VerifyConfig, run_verify, verify_line, args=("executions",), group=JUDGE
)
def verify(options: dict[str, Any]) -> None:
    """Example:

    vpd verify exec.jsonl --samples samples.jsonl --questions train.jsonl --out verified.jsonl

    vpd verify exec.jsonl --samples s.jsonl --questions q.jsonl --out v.jsonl
      --metric vqa --threshold 0.6 --policy majority --judge --backend openai
      --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct

    vpd verify exec.jsonl --samples s.jsonl --questions train.jsonl --out v.jsonl
      --transfer 3   # each correct program must also answer 3 questions of its template
    """


@stage_command(
    app,
    "rationalize",
    RationalizeConfig,
    run_rationalize,
    rationalize_line,
    args=("verified",),
    group=JUDGE,
)
def rationalize(options: dict[str, Any]) -> None:
    """Example:

    vpd rationalize verified.jsonl --questions train.jsonl --out sft.jsonl --add-labelled

    vpd rationalize verified.jsonl --questions train.jsonl --out sft.jsonl --mode llm
      --backend openai --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct
    """


# ----------------------------------------------------------------------------- execute


@stage_command(app, "execute", ExecuteConfig, run_execute, execute_line, args=("samples",))
def execute(options: dict[str, Any]) -> None:
    """Example:

    vpd execute samples.jsonl --questions data/synth/train.jsonl --out exec.jsonl

    vpd execute samples.jsonl --questions q.jsonl --out exec.0.jsonl --shard 0/4
      --workers 16 --timeout 30

    vpd execute samples.jsonl --questions gqa.jsonl --out exec.jsonl --backend hf
      --tool-opt device=cuda --tool-opt vqa=Qwen/Qwen2-VL-7B-Instruct
    """


# ----------------------------------------------------------------------------- eval


@stage_command(app, "eval", EvalConfig, run_eval, eval_line, args=("model",))
def eval_(options: dict[str, Any]) -> None:
    """Example:

    vpd eval runs/demo/model/final --questions data/synth/test.jsonl --out preds.jsonl
      --train-questions data/synth/train.jsonl

    vpd eval llava-1.5-7b-hf/ --questions vqa_val.jsonl --out p.0.jsonl --shard 0/8
      --device cuda --batch-size 32 --rationale
    """


# ----------------------------------------------------------------------------- tune


@config_command(
    app,
    "tune",
    TuneConfig,
    args=("sft",),
    extra=(
        option(
            "recipe", Path, typer.Option(None, help="YAML of tune options (recipes/tune-*.yaml).")
        ),
        option(
            "set_",
            list[str],
            typer.Option(None, "--set", help="Override a recipe option: key=value."),
        ),
    ),
)
def tune(options: dict[str, Any], recipe: Path | None, set_: list[str] | None) -> None:
    """Example:

    vpd tune runs/demo/sft.jsonl --out runs/demo/model --recipe recipes/tune-cpu.yaml

    vpd tune sft.jsonl --out model --init llava-1.5-7b-hf/ --recipe recipes/tune-gpu.yaml
      --deepspeed zero2 --set lr=2e-4

    torchrun --nproc_per_node 8 -m vpd.cli tune sft.jsonl --out model --init MODEL
      --recipe recipes/tune-gpu.yaml --deepspeed zero3
    """
    import json

    from vpd.tune import load_tune_config, run_tune

    cfg = load_tune_config(recipe, set_, **options)
    summary = run_tune(cfg)
    if summary:  # only rank 0 returns one
        print(json.dumps(summary, indent=2))


# ----------------------------------------------------------------------------- tune-writer


@stage_command(app, "tune-writer", WriterConfig, run_writer, writer_line, args=("verified",))
def tune_writer(options: dict[str, Any]) -> None:
    """Example:

    vpd tune-writer runs/demo/verified.jsonl --questions runs/demo/data/train.jsonl
      --exclude runs/demo/data/test.jsonl --out runs/demo/writer1

    vpd sample runs/demo/data/train.jsonl --out samples-r1.jsonl
      --model runs/demo/writer1/final --prompt viper/writer --shots 0

    torchrun --nproc_per_node 8 -m vpd.cli tune-writer verified.jsonl --questions train.jsonl
      --out writer --init Qwen2.5-Coder-7B-Instruct/ --deepspeed zero3 --batch-size 4
    """


# ----------------------------------------------------------------------------- sdvp


@stage_command(app, "sdvp", SdvpConfig, run_sdvp, sdvp_line, args=("executions",))
def sdvp(options: dict[str, Any]) -> None:
    """Example:

    vpd sdvp runs/demo/executions.jsonl --questions runs/demo/data/train.jsonl
      --teacher runs/demo/model/final --out runs/demo/sdvp
      --eval-samples test-samples.jsonl
      --eval-questions runs/demo/data/test.jsonl
      --tune-recipe recipes/tune-cpu.yaml --holdout-types yesno --ablation

    vpd sdvp exec.jsonl --questions q.jsonl --teacher /models/teacher --out sdvp
      --until teacher --batch-size 32 --device cuda --shard 0/4

    vpd merge --out sdvp/pointer/teacher.jsonl sdvp/pointer/teacher.shard-*.jsonl
    """


# ----------------------------------------------------------------------------- sample / serve


@stage_command(
    app,
    "sample",
    SampleConfig,
    run_sample,
    sample_line,
    args=("questions",),
    group=Group(LLMConfig, "llm"),
)
def sample(options: dict[str, Any]) -> None:
    """Example:

    vpd sample data/synth/train.jsonl --out samples.jsonl --k 5 --temperature 0.5

    vpd sample q.jsonl --out s.jsonl --concurrency 64
      --base-url http://gpu1:8000/v1 --base-url http://gpu2:8000/v1   (openai backend)

    vpd sample q.jsonl --out s.jsonl --prompt visprog/v1 --shard 0/4
    """


@stage_command(app, "serve", ServeConfig, run_serve, serve_line)
def serve(options: dict[str, Any]) -> None:
    """Example:

    vpd serve --model Qwen/Qwen2.5-Coder-7B-Instruct --port 8000 --arg=--tensor-parallel-size=2

    vpd serve   # llama.cpp + the embedded SmolLM2 GGUF, when llama-server is installed
    """


# ----------------------------------------------------------------------------- merge


@stage_command(app, "merge", MergeConfig, run_merge, merge_line, args=("inputs",))
def merge(options: dict[str, Any]) -> None:
    """Example:

    vpd merge --out exec.jsonl exec.0.jsonl exec.1.jsonl exec.2.jsonl

    vpd merge --out samples.jsonl shards/samples.*.jsonl
    """


# ----------------------------------------------------------------------------- export


@stage_command(app, "export", ExportConfig, run_export, export_line, args=("sft",))
def export(options: dict[str, Any]) -> None:
    """Example:

    vpd export runs/demo/sft.jsonl --format llamafactory --out LLaMA-Factory/data
      --name vpd_gqa

    vpd export runs/demo/sft.jsonl --format trl --out exports/trl

    vpd export runs/demo/sft.jsonl --format hf --out exports/hf --task rationale
    """


# ----------------------------------------------------------------------------- view / report


@stage_command(app, "view", ViewConfig, run_view, view_line, args=("run_dir",))
def view(options: dict[str, Any]) -> None:
    """Example:

    vpd view runs/demo-cpu          # writes runs/demo-cpu/view/index.html

    vpd view --questions data/test.jsonl --verified verified.jsonl --sft sft.jsonl
      --preds eval/vpd.jsonl --preds labels=eval/labels.jsonl --out site

    vpd view runs/demo-cpu --rate --serve 8000
    """


@stage_command(app, "report", ReportConfig, run_report, report_line, args=("run_dir",))
def report(options: dict[str, Any]) -> None:
    """Example:

    vpd report runs/demo-cpu

    vpd report --ratings ratings.jsonl --out ratings-table.md
    """


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: every user error as one line on stderr with exit code 2.

    Usage errors (typer's), config errors (pydantic's, named by flag), VpdError and
    OSError (an output folder that cannot be made, a read-only file...) all end here;
    ``VPD_DEBUG=1`` re-raises them with their traceback.
    """
    import os

    from pydantic import ValidationError
    from rich.markup import escape
    from typer.exceptions import TyperException

    from vpd.progress import console

    def fail(msg: str) -> None:
        if os.environ.get("VPD_DEBUG"):
            raise
        console().print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
        sys.exit(2)

    try:
        code = app(argv, standalone_mode=False, prog_name="vpd")
    except TyperException as e:  # usage errors: a bad flag, a missing argument
        format_message = getattr(e, "format_message", None)
        msg = format_message() if callable(format_message) else str(e)
        ctx = getattr(e, "ctx", None)
        fail(f"{msg} (see `{ctx.command_path} --help`)" if ctx is not None else msg)
    except VpdError as e:
        fail(str(e))
    except ValidationError as e:
        fail(validation_line(e))
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            sys.exit(0)
        fail(os_error_line(e))
    except KeyboardInterrupt:
        console().print("[yellow]interrupted[/yellow]: run the same command again to resume")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
