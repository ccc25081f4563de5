"""`vpd` command line: one thin sub-command per pipeline stage.

Logic lives in the stage modules; this file only turns flags into a call. User
errors (``VpdError``) print as one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vpd.errors import VpdError

app = typer.Typer(
    help=(
        "Visual Program Distillation: LLM-written programs over vision tools, "
        "distilled into a VLM.\n\n"
        "Pipeline: data -> sample -> execute -> verify -> rationalize -> tune -> eval. "
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
        False, help="Re-run stages whose options changed, and all after them."
    ),
) -> None:
    """Run the whole pipeline from one recipe; re-run the same command to resume.

    Example:

      vpd run recipes/demo-cpu.yaml --run-dir runs/demo

      vpd run recipes/demo-cpu.yaml --set sample.k=3 --set tune.max_steps=50 --force
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
    from rich.table import Table

    from vpd.pipeline import RunPaths
    from vpd.progress import console
    from vpd.report import progress_counts, stage_table, write_report

    if not run_dir.is_dir():
        _fail(f"run directory not found: {run_dir}")
    if not (run_dir / "recipe.yaml").exists():
        _fail(f"{run_dir} is not a vpd run directory (no recipe.yaml); start one with `vpd run`")
    p = RunPaths(run_dir)
    counts = progress_counts(p)
    table = Table(title=f"vpd run: {run_dir}")
    for col in ("stage", "state", "progress", "wall (s)"):
        table.add_column(col)
    colors = {"done": "green", "partial": "yellow", "not started": "dim"}
    for row in stage_table(p):
        st = row["state"]
        table.add_row(
            row["stage"], f"[{colors[st]}]{st}[/]", counts[row["stage"]], str(row.get("wall_s", ""))
        )
    console().print(table)
    if report:
        out = write_report(run_dir)
        console().print(f"report: {out['md']}")


# ----------------------------------------------------------------------------- merge


@app.command()
def merge(
    out: Path = typer.Option(..., "--out", help="Merged output JSONL."),
    inputs: list[Path] = typer.Argument(..., help="Shard outputs to join."),
    force: bool = typer.Option(False, help="Start --out over if it holds another config."),
) -> None:
    """Join the outputs of `--shard i/n` runs into one file, without duplicates.

    Example:

      vpd merge --out exec.jsonl exec.0.jsonl exec.1.jsonl exec.2.jsonl
    """
    from vpd.progress import console
    from vpd.store import merge as do_merge

    written, dup = do_merge(out, inputs, force=force)
    console().print(
        f"merged {len(inputs)} files into {out}: {written} new records, "
        f"{dup} duplicates skipped"
    )


# ----------------------------------------------------------------------------- entry point


def main() -> None:
    """Console-script entry: one-line errors with exit code 2 instead of tracebacks."""
    from vpd.progress import console

    try:
        app()
    except VpdError as e:
        console().print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console().print("[yellow]interrupted[/yellow]: run the same command again to resume")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
