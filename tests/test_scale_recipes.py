"""recipes/scale/*: the scripts parse (`bash -n`), and every `vpd` command they run or show
in a comment exists and accepts every flag it passes (and its --help shows them)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import typer

from tests.helpers import REPO, invoke_vpd
from vpd.cli import app

SCALE = REPO / "recipes" / "scale"
SCRIPTS = sorted(p for p in SCALE.iterdir() if p.suffix in (".sh", ".sbatch"))
# The commands each file runs (or documents): a file that stops calling one fails here.
EXPECTED = {
    "hosts.sh": {"sample", "execute", "merge"},
    "sample-execute-array.sbatch": {"sample", "execute", "merge", "run"},
    "hostfile.example": {"tune"},
}
CALL = re.compile(r"(?<![\w-])vpd(?:\.cli)?\s+([a-z][a-z-]*)")
END = re.compile(r"&&|\|\||[;|&`]")


def vpd_calls(text: str) -> list[tuple[str, list[str]]]:
    """Each `vpd COMMAND ...` (also `-m vpd.cli COMMAND`) with the --flags it passes, from
    the code and from the comments (which show the commands to run by hand)."""
    lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
    joined = "\n".join(lines).replace("\\\n", " ")  # continuation lines are one command
    calls = []
    for line in joined.splitlines():
        for m in CALL.finditer(line):
            rest = END.split(line[m.end() :], maxsplit=1)[0]
            flags = [t.split("=")[0] for t in rest.replace('"', " ").split() if t[:2] == "--"]
            calls.append((m.group(1), flags))
    return calls


def test_the_scale_recipes_are_all_here() -> None:
    assert sorted(p.name for p in SCALE.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_vpd_flag_exists(name: str) -> None:
    calls = vpd_calls((SCALE / name).read_text())
    assert {cmd for cmd, _ in calls} == EXPECTED[name]
    commands = typer.main.get_command(app).commands  # what parses the command line
    for cmd, flags in calls:
        assert cmd in commands, f"{name}: no `vpd {cmd}`"
        accepted = {o for p in commands[cmd].params for o in (*p.opts, *p.secondary_opts)}
        missing = [f for f in flags if f not in accepted]
        assert not missing, f"{name}: `vpd {cmd}` has no {missing}"
        # ... and `vpd CMD --help` shows them (the help is rendered from the same options).
        res = invoke_vpd(cmd, "--help")
        assert all(f in res.output for f in flags), res.output


def test_the_flag_reader_reads_continued_and_chained_commands() -> None:
    text = (
        "# run by hand:\n#   vpd merge --out a.jsonl b.jsonl\n"
        'ssh h "cd x && .venv/bin/vpd sample q.jsonl \\\n'
        '    --out s.jsonl --k 5 && .venv/bin/vpd execute s.jsonl --workers=2" &\n'
        "python -m vpd.cli tune sft.jsonl --init m; vpd-shard --bogus\n"
    )
    assert vpd_calls(text) == [
        ("merge", ["--out"]),
        ("sample", ["--out", "--k"]),
        ("execute", ["--workers"]),
        ("tune", ["--init"]),
    ]
