"""`vpd view` as a config and a run function, like the stages: the site of a run directory
or of stage files, then (``serve``) a local server that also takes ratings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpd.errors import VpdError
from vpd.progress import console
from vpd.view.data import ViewInputs, run_inputs
from vpd.view.site import SiteSummary, write_site


def _arm_file(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the arm named by the file's stem)."""
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep and name else (Path(spec).stem, Path(spec))


class ViewConfig(BaseModel):
    """Write a static site to browse a run: every question, its programs and their steps
    drawn on the image, the verdicts, the rationales and each arm's answer.

    The site opens from disk (SITE/index.html; no server, no internet). Without RUN_DIR,
    name the stage files. With --rate, each rationale gets the VPD paper's human-evaluation
    questions (answer right? factual? consistent?); ratings stay in the browser (export
    button) or, with --serve, go to the ratings file; `vpd report --ratings` makes the table.

    Every option of `vpd view`.
    """

    model_config = ConfigDict(extra="forbid")

    run_dir: Path | None = Field(None, description="A run directory made by `vpd run`.")
    out: Path | None = Field(None, description="Site folder (default: RUN_DIR/view).")
    questions: list[Path] = Field(
        default_factory=list, description="Questions JSONL, without RUN_DIR (repeatable)."
    )
    verified: Path | None = Field(None, description="Verified programs (vpd verify).")
    executions: Path | None = Field(
        None, description="Executed programs without a verdict (vpd execute)."
    )
    sft: Path | None = Field(None, description="SFT records: their rationales are shown.")
    preds: list[str] = Field(
        default_factory=list,
        description="An arm's predictions (vpd eval): PATH or NAME=PATH (repeatable).",
    )
    rate: bool = Field(False, description="Add the human-evaluation questions to each rationale.")
    copy_images: bool = Field(
        False, description="Copy the images into the site (default: symbolic links)."
    )
    serve: int | None = Field(
        None, description="Then serve the site on this port of 127.0.0.1 (Ctrl-C stops)."
    )
    ratings: Path | None = Field(
        None, description="With --serve: ratings JSONL to append (default SITE/ratings.jsonl)."
    )

    def site(self) -> Path:
        if self.out is not None:
            return self.out
        if self.run_dir is None:
            raise VpdError("--out is needed without RUN_DIR")
        return Path(self.run_dir) / "view"

    def inputs(self) -> ViewInputs | None:
        """What to build the site from (None: only serve an existing site)."""
        stage_files = self.questions or self.verified or self.executions or self.sft or self.preds
        if self.run_dir is not None and stage_files:
            raise VpdError("give RUN_DIR or the stage files (--questions, --verified...), not both")
        if self.run_dir is not None:
            if not self.run_dir.is_dir():
                raise VpdError(f"run directory not found: {self.run_dir}")
            return run_inputs(self.run_dir)
        if self.questions:
            return ViewInputs(
                questions=list(self.questions),
                verified=self.verified,
                executions={"execute": self.executions} if self.executions else {},
                sft=self.sft,
                preds=dict(_arm_file(p) for p in self.preds),
            )
        if self.serve is None or self.out is None:
            raise VpdError(
                "give a RUN_DIR, or --questions with the stage files (see `vpd view --help`)"
            )
        return None


def run_view(cfg: ViewConfig) -> SiteSummary | None:
    """Write the site (unless only serving one), then serve it when asked."""
    out = cfg.site()
    inputs = cfg.inputs()
    summary = (
        write_site(inputs, out, rate=cfg.rate, copy_images=cfg.copy_images) if inputs else None
    )
    if summary is not None and cfg.serve is not None:
        console().print(summary_line(cfg, summary), markup=False, highlight=False)
    if cfg.serve is not None:
        from vpd.view.server import make_server

        path = cfg.ratings or out / "ratings.jsonl"
        httpd = make_server(out, cfg.serve, path)
        port = httpd.server_address[1]
        console().print(
            f"serving {out} at http://127.0.0.1:{port}/ (ratings -> {path}; Ctrl-C stops)"
        )
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
        return None  # its line was printed before serving
    return summary


def summary_line(cfg: ViewConfig, s: SiteSummary | None) -> str:
    """What `vpd view` prints when the site is written."""
    if s is None:
        return f"view: served {cfg.site()}"
    msg = (
        f"view -> {s.index}: {s.questions} questions, {s.programs} programs, "
        f"{s.rationales} rationales" + (f", arms {', '.join(s.arms)}" if s.arms else "")
    )
    for what, n in s.skipped.items():
        msg += f"; {n} bad lines skipped in {what}"
    return msg


def ratings_report(paths: list[Path], out: Path | None = None) -> dict[str, Any]:
    """The ratings table of `vpd report --ratings` (``markdown`` and ``table``), also
    written to ``out`` (Markdown) and its ``.json`` when given."""
    import json

    from vpd.store import atomic_write
    from vpd.view.ratings import ratings_markdown, ratings_table, read_ratings

    recs = read_ratings(paths)
    if not recs:
        raise VpdError(f"no ratings in {', '.join(map(str, paths))}")
    table = ratings_table(recs)
    md = ratings_markdown(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, md)
        atomic_write(out.with_suffix(".json"), json.dumps(table, indent=2))
    return {"markdown": md, "table": table}
