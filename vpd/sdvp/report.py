"""SDVP's report: where it is written (``OUT/sdvp.json``) and its two renderings, the table
`vpd sdvp` prints and the Markdown of the run report's SDVP section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpd.progress import console


def report_path(out: Path) -> Path:
    return Path(out) / "sdvp.json"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _diff_text(c: dict[str, Any] | None) -> str:
    if not c or c.get("diff") is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{100 * c['diff']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def result_table(rep: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(columns, rows, notes) of the accuracy table: one row per question type and "all",
    one column per tools' VLM (before / after / teacher / ablation variants); the notes
    give each difference with its interval and the cross-task check."""
    cols = [c for c in ("before", "after", "teacher") if c in rep]
    cols += list(rep.get("ablation") or {})
    if not cols:
        return [], [], [rep.get("note", "no evaluation")]

    def entry(c: str) -> dict[str, Any]:
        return rep[c] if c in rep else rep["ablation"][c]

    held = set(rep.get("holdout_types") or [])
    rows = []
    for t in sorted({t for c in cols for t in entry(c).get("per_type", {})}):
        per = entry(cols[0])["per_type"].get(t, {})
        row = [f"{t} (held out)" if t in held else t, str(per.get("n", ""))]
        rows.append(row + [_pct(entry(c)["per_type"].get(t, {}).get("accuracy")) for c in cols])
    rows.append(["all", str(entry(cols[0])["n"])] + [_pct(entry(c)["accuracy"]) for c in cols])
    notes = [
        f"{c} - before: {_diff_text(entry(c).get('vs_before'))} (95% paired bootstrap)"
        for c in cols[1:]
    ]
    ho = rep.get("held_out")
    if ho:
        verdict = {True: "ok", False: "DROPPED", None: "not measured"}[ho.get("ok")]
        notes.append(
            f"cross-task check on {', '.join(ho['types'])} (n={ho['n']}): "
            f"{_pct(ho.get('before'))} -> {_pct(ho.get('after'))}, {_diff_text(ho)}: {verdict}"
        )
    return ["question type", "n", *cols], rows, notes


def print_report(rep: dict[str, Any]) -> None:
    """The accuracy table and the checks (see :func:`result_table`), to stderr."""
    from rich.table import Table

    cols, rows, notes = result_table(rep)
    con = console()
    if cols:
        table = Table(title="SDVP: program accuracy on held-out questions, by the tools' VLM")
        for i, c in enumerate(cols):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in rows[:-1]:
            table.add_row(*row)
        table.add_section()
        table.add_row(*rows[-1])
        con.print(table)
    for n in notes:
        con.print(n)


def markdown_report(rep: dict[str, Any]) -> list[str]:
    """The same table and notes as Markdown lines (the run report's SDVP section)."""
    cols, rows, notes = result_table(rep)
    lines = []
    sub = rep.get("subtasks") or {}
    if sub:
        lines += [
            f"Teacher `{rep.get('teacher_model')}` distilled into the tools' VLM "
            f"`{rep.get('student_model')}` on {sub.get('distilled')} sub-tasks "
            f"({sub.get('per_op')}); {sub.get('held_out')} sub-tasks of held-out types "
            "left out.",
            "",
        ]
    for name, v in (rep.get("variants") or {}).items():
        s = v.get("sft") or {}
        lines.append(f"- `{name}`: {v.get('adapter')}; {s.get('records', '-')} student records")
    if lines and lines[-1]:
        lines.append("")
    if cols:
        lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[:-1]]
        last = rows[-1]
        lines.append("| **all** | " + " | ".join(last[1:]) + " |")
        lines.append("")
    lines += [f"- {n}" for n in notes]
    return lines


def summary_line(cfg: Any, rep: dict[str, Any]) -> str:
    """What `vpd sdvp` prints when it is done (after the table, with ``progress``)."""
    if cfg.progress:
        print_report(rep)
    msg = f"sdvp -> {cfg.out}: report in {cfg.out / 'sdvp.json'}"
    rejected = (rep.get("subtasks") or {}).get("rejected_input_lines")
    if rejected:
        msg += (
            f"; {rejected} rejected input lines (reasons in {cfg.out / 'subtasks.rejects.jsonl'})"
        )
    return msg
