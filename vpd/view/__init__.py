"""`vpd view`: a static browser view of a run (every program, its steps on the image, the
verdict, the rationale, the arms' answers) and human ratings of the rationales.

- ``data``: the stage files joined per question, and the index's columns;
- ``site``: the site folder (Jinja2 templates in ``templates/``, plain JS in ``static/``);
- ``server``: ``--serve``, a local HTTP server that also takes ratings;
- ``ratings``: the rating record and the table `vpd report --ratings` prints.
"""

from __future__ import annotations

from pathlib import Path

from vpd.view.data import ViewInputs, run_inputs
from vpd.view.site import SiteSummary, write_site

__all__ = ["ViewInputs", "SiteSummary", "run_inputs", "write_site", "write_run_site", "site_dir"]


def site_dir(run_dir: Path) -> Path:
    """Where `vpd run` and `vpd view RUN_DIR` put a run's site."""
    return Path(run_dir) / "view"


def write_run_site(run_dir: Path, out: Path | None = None, **kw: bool) -> SiteSummary:
    """The site of a `vpd run` directory (into ``RUN_DIR/view`` by default)."""
    return write_site(run_inputs(run_dir), out or site_dir(run_dir), **kw)
