"""Write the static site of `vpd view`: pages from Jinja2 templates, data as JS files.

Layout of the site folder (everything a page needs is in it; no CDN, no build step):

- ``index.html``: the run report (report.md rendered, its plots copied), else the index;
- ``questions.html``: the index (``assets/index.js`` over ``data/index.js``);
- ``question.html?id=QID``: one page for every question (``assets/question.js`` loads
  ``data/q/NNNNN.js``, the shard its id hashes to);
- ``data/meta.js``: the site's settings (title, arms, rating mode, shard count, site id).

Data files are scripts (``window.X = {...}``), not JSON fetched at run time: a page opened
from disk (file://) may load a ``<script src>`` but not fetch() a local file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.store import atomic_write
from vpd.view.data import ViewInputs, build_site_data, shard_count, shard_of

PKG = Path(__file__).resolve().parent
ASSETS = ("view.css", "common.js", "index.js", "question.js")


@dataclass
class SiteSummary:
    out: Path
    index: Path  # the page to open first
    questions: int
    programs: int
    rationales: int
    arms: list[str]
    shards: int
    skipped: dict[str, int]


def _env() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(PKG / "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )


def _js(var: str, obj: Any) -> str:
    return f"window.{var}=" + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + ";\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def render_report(md_path: Path, out: Path) -> str:
    """report.md as HTML; the images it links (the run's plots) copied into ``out/plots``."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(md_path.read_text(encoding="utf-8"))
    for tok in tokens:
        for child in tok.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            local = md_path.parent / src
            if "://" in src or not local.is_file():
                continue
            dest = out / "plots" / local.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dest)
            child.attrSet("src", f"plots/{local.name}")
    return md.renderer.render(tokens, md.options, {})


def write_site(
    inputs: ViewInputs, out: Path, *, rate: bool = False, copy_images: bool = False
) -> SiteSummary:
    """Build the site of ``inputs`` into ``out`` (made or refreshed in place)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VpdError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    data = build_site_data(inputs, out, copy_images=copy_images)
    n_shards = shard_count(len(data.questions))
    title = inputs.title or out.resolve().name
    # Ratings are kept per site in the browser; the same folder rebuilt keeps its ratings.
    site_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    has_report = inputs.report_md is not None

    for name in ASSETS:
        dest = out / "assets" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PKG / "static" / name, dest)

    meta = {
        "title": title,
        "site_id": site_id,
        "n_shards": n_shards,
        "n_questions": len(data.questions),
        "arms": data.arms,
        "rate": rate,
        "has_report": has_report,
    }
    _write(out / "data" / "meta.js", _js("VPD_META", meta))
    _write(out / "data" / "index.js", _js("VPD_INDEX", data.index))
    shards: list[dict[str, Any]] = [{} for _ in range(n_shards)]
    for q in data.questions:
        shards[shard_of(q["id"], n_shards)][q["id"]] = q
    qdir = out / "data" / "q"
    if qdir.exists():  # an earlier build may have had more shards
        shutil.rmtree(qdir)
    for i, recs in enumerate(shards):
        body = json.dumps(recs, ensure_ascii=False, separators=(",", ":"))
        _write(qdir / f"{i:05d}.js", f"VPD_SHARD({body});\n")

    env = _env()
    ctx = {"title": title, "n_questions": len(data.questions)}
    questions_html = env.get_template("questions.html").render(**ctx)
    _write(out / "questions.html", questions_html)
    _write(out / "question.html", env.get_template("question.html").render(**ctx))
    if has_report:
        body = render_report(inputs.report_md, out)  # type: ignore[arg-type]
        _write(out / "index.html", env.get_template("report.html").render(body=body, **ctx))
    else:
        _write(out / "index.html", questions_html)
    return SiteSummary(
        out=out,
        index=out / "index.html",
        questions=len(data.questions),
        programs=sum(len(q["programs"]) for q in data.questions),
        rationales=sum(len(q["rationales"]) for q in data.questions),
        arms=data.arms,
        shards=n_shards,
        skipped=data.skipped,
    )
