"""Human ratings of rationales, as in the VPD paper's human evaluation, and their table.

The rating page (``vpd view --rate``) asks three yes/no questions of each rationale: is the
answer right, is the explanation factual (every step true of the image), is it consistent
with the answer. Each change is one JSONL line (:class:`Rating`): saved in the browser and
exported, or appended by the ``--serve`` server. A file may hold several lines for one
rationale (a rater changed their mind): the last one counts, per rater.

:func:`ratings_table` turns the ratings into shares per question type (and per rationale
source when there are several: the program rationales of the SFT data, a VLM arm's own),
each with its percentile bootstrap 95% interval (``vpd.evaluate.accuracy_interval``: the
rated rationales resampled; seed 0, 10,000 resamples, as the run report's intervals).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vpd.errors import VpdError
from vpd.evaluate import accuracy_interval

CRITERIA = ("answer_right", "factual", "consistent")
CRITERIA_TEXT = {
    "answer_right": "answer right",
    "factual": "factual",
    "consistent": "consistent",
}
ALL = "all"


class Rating(BaseModel):
    """One rater's verdict on one rationale (``None``: not rated on that question yet)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)  # the rationale's id: an SFT record's, or "<qid>/<arm>"
    qid: str = Field(min_length=1)
    source: str = "sft"  # "sft" (a program's rationale) or "arm:<name>" (a VLM's own)
    type: str = ALL  # the question's type
    dataset: str = ""
    answer_right: bool | None = None
    factual: bool | None = None
    consistent: bool | None = None
    rater: str = ""
    time: str = ""


def parse_rating(obj: Any) -> Rating:
    """A rating from a JSON object; a VpdError naming the field when it is not one."""
    try:
        return Rating.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "record"
        raise VpdError(f"not a rating: {where}: {err['msg']}") from None


def read_ratings(paths: Iterable[Path]) -> list[Rating]:
    """The ratings in force: the last line per (rationale, rater) across the files, in order."""
    latest: dict[tuple[str, str], Rating] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise VpdError(f"ratings file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = parse_rating(json.loads(line))
                except (json.JSONDecodeError, VpdError) as e:
                    msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                    raise VpdError(f"{path}:{n}: {msg}") from None
                latest.pop((r.id, r.rater), None)  # re-insert: order of last change
                latest[(r.id, r.rater)] = r
    return list(latest.values())


def _share(ratings: list[Rating], crit: str, n_boot: int, seed: int) -> dict[str, Any]:
    vals = [getattr(r, crit) for r in ratings]
    scores = {
        f"{i}": (r.type, 1.0 if v else 0.0)
        for i, (r, v) in enumerate(zip(ratings, vals, strict=True))
        if v is not None
    }
    if not scores:
        return {"share": None, "lo": None, "hi": None, "n": 0}
    share = sum(s for _, s in scores.values()) / len(scores)
    lo, hi = accuracy_interval(scores, n_boot=n_boot, seed=seed) or (None, None)
    return {"share": round(share, 6), "lo": lo, "hi": hi, "n": len(scores)}


def _row(group: str, ratings: list[Rating], n_boot: int, seed: int) -> dict[str, Any]:
    return {
        "group": group,
        "rationales": len(ratings),
        **{c: _share(ratings, c, n_boot, seed) for c in CRITERIA},
    }


def ratings_table(ratings: list[Rating], *, n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Shares of "yes" per criterion: over all ratings, per question type, and per
    rationale source (when there are several); each with its 95% interval and the number
    of rationales rated on that criterion."""
    types = sorted({r.type for r in ratings})
    sources = sorted({r.source for r in ratings})
    out: dict[str, Any] = {
        "criteria": list(CRITERIA),
        "n_ratings": len(ratings),
        "raters": sorted({r.rater for r in ratings}),
        "all": _row(ALL, ratings, n_boot, seed),
        "per_type": [_row(t, [r for r in ratings if r.type == t], n_boot, seed) for t in types],
        "per_source": [],
        "interval": {"method": "percentile bootstrap", "level": 0.95, "n_boot": n_boot},
    }
    if len(sources) > 1:
        out["per_source"] = [
            _row(s, [r for r in ratings if r.source == s], n_boot, seed) for s in sources
        ]
    return out


def _cell(c: dict[str, Any]) -> str:
    if c["share"] is None:
        return "-"
    return f"{100 * c['share']:.1f}% [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}] ({c['n']})"


def ratings_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: share (95% interval) (rationales rated), per type and source."""
    head = ["type", "rationales", *(CRITERIA_TEXT[c] for c in CRITERIA)]
    lines = [
        "## Human ratings of the rationales",
        "",
        f"{table['n_ratings']} rated rationales"
        + (f", {len(table['raters'])} raters" if len(table["raters"]) > 1 else "")
        + ". Share of yes [95% bootstrap interval] (rationales rated on that question).",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]

    def line(row: dict[str, Any], bold: bool = False) -> str:
        name = f"**{row['group']}**" if bold else row["group"]
        cells = [name, str(row["rationales"]), *(_cell(row[c]) for c in CRITERIA)]
        return "| " + " | ".join(cells) + " |"

    lines.append(line(table["all"], bold=True))
    lines += [line(r) for r in table["per_type"]]
    if table["per_source"]:
        lines += ["", "| source | " + " | ".join(head[1:]) + " |", "|---" * len(head) + "|"]
        lines += [line(r) for r in table["per_source"]]
    return "\n".join(lines) + "\n"
