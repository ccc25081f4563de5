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
