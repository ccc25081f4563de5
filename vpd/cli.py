"""`vpd` command line: one thin sub-command per pipeline stage.

Logic lives in the stage modules; this file only turns flags into a call. User
errors (``VpdError``) print as one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import errno
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
from vpd.flags import Group, config_command, option, stage_command, validation_line
from vpd.llm.config import LLMConfig
from vpd.rationalize import RationalizeConfig, run_rationalize
from vpd.rationalize import summary_line as rationalize_line
from vpd.sample.runner import SampleConfig, run_sample
from vpd.sample.runner import summary_line as sample_line
from vpd.sdvp import SdvpConfig, run_sdvp
from vpd.sdvp.report import summary_line as sdvp_line
from vpd.tune.config import TuneConfig
from vpd.verify import VerifyConfig, run_verify
from vpd.verify import summary_line as verify_line
from vpd.view.command import ViewConfig, ratings_report, run_view
from vpd.view.command import summary_line as view_line

app = typer.Typer(
    help=(
        "Visual Program Distillation: LLM-written programs over vision tools, "
        "distilled into a VLM.\n\n"
        "Pipeline: data -> sample -> execute -> verify -> rationalize -> tune -> eval "
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


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (default: recipe's)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a recipe option: stage.key=value (repeatable)."
    ),
    only: list[str] = typer.Option([], "--only", help="Run only these stages (repeatable)."),
    force: bool = typer.Option(
        False, help="Re-run stages whose options changed, and the stages that read them."
    ),
) -> None:
    """Run the whole pipeline from one recipe; re-run the same command to resume.

    Example:

      vpd run recipes/demo-cpu.yaml --run-dir runs/demo

      vpd run recipes/demo-cpu.yaml --set sample.k=3 --set tune.max_steps=50 --force

      vpd run recipes/ablation-cpu.yaml --run-dir runs/ablation   # every arm of the ablation
    """
    from vpd.pipeline import STAGES, run_pipeline

    bad = [s for s in only if s not in STAGES]
    if bad:
        _fail(f"--only: unknown stage(s) {bad}; stages are {list(STAGES)}")
    run_pipeline(recipe, run_dir, overrides=set_, only=only or None, force=force)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="A run directory made by `vpd run`."),
    report: bool = typer.Option(False, "--report", help="Also (re)write report.md/json."),
) -> None:
    """Show each stage's progress in a run directory.

    Example:

      vpd status runs/demo-cpu
    """
    from vpd.progress import console
    from vpd.report import status_table, write_report

    console().print(status_table(run_dir))
    if report:
        out = write_report(run_dir)
        console().print(f"report: {out['md']}")


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


@app.command()
def serve(
    model: str = typer.Option(None, help="Model to serve (vLLM: HF id/folder; llama.cpp: .gguf)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the server to be ready."),
    extra: list[str] = typer.Option([], "--arg", help="Extra argument for the server (repeat)."),
) -> None:
    """Start an OpenAI-compatible LLM server (vLLM, else llama.cpp) and print its base URL.

    Example:

      vpd serve --model Qwen/Qwen2.5-Coder-7B-Instruct --port 8000 --arg=--tensor-parallel-size=2

      vpd serve   # llama.cpp + the embedded SmolLM2 GGUF, when llama-server is installed
    """
    from vpd.llm.serve import serve as run_server
    from vpd.progress import console

    def ready(url: str, cmd: object) -> None:
        console().print(f"{getattr(cmd, 'kind', 'server')} is ready (Ctrl-C stops it)")
        print(url, flush=True)  # stdout: the one thing scripts want

    rc = run_server(model, host, port, timeout, extra, on_ready=ready)
    if rc:
        raise typer.Exit(rc)


# ----------------------------------------------------------------------------- merge


@app.command()
def merge(
    out: Path = typer.Option(..., "--out", help="Merged output JSONL."),
    inputs: list[Path] = typer.Argument(
        ..., help="Shard outputs to join (side files such as *.rejects.jsonl are skipped)."
    ),
    force: bool = typer.Option(False, help="Start --out over if it holds another config."),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Write an empty --out when the inputs hold no record."
    ),
) -> None:
    """Join the outputs of `--shard i/n` runs into one file, without duplicates.

    Each line is checked against the record type of the stage that wrote the shards
    (named in their .meta.json); bad lines go to OUT.rejects.jsonl with a reason.
    Run it again after more shards finish: only new ids are appended.

    Example:

      vpd merge --out exec.jsonl exec.0.jsonl exec.1.jsonl exec.2.jsonl

      vpd merge --out samples.jsonl shards/samples.*.jsonl
    """
    from vpd.progress import console
    from vpd.store import merge as do_merge

    s = do_merge(out, inputs, force=force, allow_empty=allow_empty)
    console().print(s.line(out), markup=False, highlight=False)


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


@app.command()
def report(
    run_dir: Path = typer.Argument(None, help="A run directory: (re)write its report."),
    ratings: list[Path] = typer.Option(
        [], "--ratings", help="Ratings JSONL from `vpd view --rate` (repeatable)."
    ),
    out: Path = typer.Option(
        None, "--out", help="With --ratings: also write the table to OUT (Markdown) and its JSON."
    ),
) -> None:
    """Write a run's report, or turn human ratings into their table.

    The ratings table: the share of rationales rated factual, consistent with the answer,
    and with the answer right, overall and per question type, each with its bootstrap 95%
    interval (as the VPD paper's human evaluation).

    Example:

      vpd report runs/demo-cpu

      vpd report --ratings ratings.jsonl --out ratings-table.md
    """
    from vpd.progress import console
    from vpd.report import write_report

    if run_dir is None and not ratings:
        _fail("give a RUN_DIR or --ratings FILE (see `vpd report --help`)")
    if run_dir is not None:
        if not (run_dir / "recipe.yaml").exists():
            _fail(f"{run_dir} is not a vpd run directory (no recipe.yaml)")
        console().print(f"report: {write_report(run_dir)['md']}")
    if ratings:
        print(ratings_report(ratings, out)["markdown"], end="")


# ----------------------------------------------------------------------------- entry point


def _os_line(e: OSError) -> str:
    """An OSError as one line: what failed and on which path (no errno tuple)."""
    what = e.strerror or type(e).__name__
    paths = [str(x) for x in (e.filename, e.filename2) if x is not None]
    if paths:
        # mkdir under a file says "File exists" about the file: say which one is in the way.
        blocker = next((a for a in Path(paths[0]).parents if a.is_file()), None)
        if blocker is None and Path(paths[0]).is_file() and e.errno == errno.EEXIST:
            blocker = Path(paths[0])
        if blocker is not None:
            return f"cannot write under {blocker}: it is a file, not a folder"
    return f"{what}: {' -> '.join(paths)}" if paths else str(e)


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
        fail(_os_line(e))
    except KeyboardInterrupt:
        console().print("[yellow]interrupted[/yellow]: run the same command again to resume")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
