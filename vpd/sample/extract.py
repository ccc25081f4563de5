"""Program extraction: LLM completion text -> a program in the executor's syntax, or why not.

ViperGPT: take the fenced code block holding ``def execute_command`` (or the whole text),
keep the function (a lone ``def other(image)`` is renamed), drop top-level imports and
chatter after the function, and ``ast.parse`` it; a completion cut off mid-statement by
``max_tokens`` is trimmed back to the longest prefix that parses and still returns.
VisProg: keep the ``VAR=MODULE(...)`` lines, add the final ``RESULT`` step when missing, and
check it with the executor's own parser. This is a cheap syntax gate; the sandbox's static
check and execution decide the rest.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

ENTRY = "execute_command"
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_STEP = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*([A-Z_][A-Z0-9_]*)\s*\(.*\)\s*$")


@dataclass
class Extracted:
    program: str = ""
    valid: bool = False
    reason: str | None = None
    repaired: str | None = None  # what normalization changed, if anything notable


def _blocks(text: str) -> list[str]:
    return [m.group(2) for m in _FENCE.finditer(text)]


def _returns(fn: ast.FunctionDef) -> bool:
    return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(fn))


def _function_source(code: str) -> tuple[str | None, str | None]:
    """(source of the entry function, rename note) from code that may hold other text."""
    lines = code.replace("\t", "    ").splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"\s*def\s+\w+\s*\(", ln)]
    if not starts:
        return None, None
    named = [i for i in starts if re.match(rf"\s*def\s+{ENTRY}\s*\(", lines[i])]
    note = None
    if named:
        i = named[0]
    else:
        # A model that names its function count_red_circles(image) still wrote a program.
        i = starts[0]
        old = re.match(r"\s*def\s+(\w+)", lines[i]).group(1)  # type: ignore[union-attr]
        lines[i] = re.sub(rf"def\s+{old}\s*\(", f"def {ENTRY}(", lines[i], count=1)
        note = f"renamed function {old} to {ENTRY}"
    indent = len(lines[i]) - len(lines[i].lstrip())
    body = [lines[i]]
    for ln in lines[i + 1 :]:
        if ln.strip() and (len(ln) - len(ln.lstrip())) <= indent:
            break  # back at the def's level: the function ended (chatter or other code)
        body.append(ln)
    while body and not body[-1].strip():
        body.pop()
    return textwrap.dedent("\n".join(body)), note


def _parse_prefix(src: str) -> tuple[str, ast.FunctionDef] | None:
    """The longest line prefix of ``src`` that parses into a returning entry function."""
    lines = src.splitlines()
    for end in range(len(lines), 1, -1):
        cand = "\n".join(lines[:end])
        try:
            tree = ast.parse(cand)
        except SyntaxError:
            continue
        fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == ENTRY]
        if fns and _returns(fns[0]):
            return cand, fns[0]
    return None


def extract_viper(text: str) -> Extracted:
    blocks = _blocks(text)
    with_entry = [b for b in blocks if re.search(rf"def\s+{ENTRY}\s*\(", b)]
    code = with_entry[0] if with_entry else (blocks[0] if blocks else text)
    src, note = _function_source(code)
    if src is None and blocks:
        src, note = _function_source(text)
    if src is None:
        return Extracted(reason="no function definition in the completion")
    fn_args = re.match(rf"def {ENTRY}\s*\(([^)]*)\)", src)
    if fn_args is None:
        return Extracted(reason="malformed function header")
    try:
        tree = ast.parse(src)
        fn = tree.body[0]
        assert isinstance(fn, ast.FunctionDef)
        if not _returns(fn):
            return Extracted(program=src, reason="the function never returns a value")
        repaired = note
    except SyntaxError as e:
        found = _parse_prefix(src)
        if found is None:
            return Extracted(program=src, reason=f"syntax error: {e.msg} (line {e.lineno})")
        src, fn = found
        repaired = "; ".join(x for x in (note, "cut an unfinished tail") if x)
    if len(fn.args.args) != 1:
        return Extracted(program=src, reason=f"{ENTRY} must take one argument (image)")
    return Extracted(program=src.rstrip() + "\n", valid=True, repaired=repaired)


def extract_visprog(text: str) -> Extracted:
    from vpd.tools.visprog import check_visprog

    blocks = _blocks(text)
    code = next((b for b in blocks if _STEP.search(b.splitlines()[0] if b else "")), None)
    source = code if code is not None else (blocks[0] if blocks else text)
    steps = [ln.strip() for ln in source.splitlines() if _STEP.match(ln)]
    if not steps and code is None and blocks:
        steps = [ln.strip() for ln in text.splitlines() if _STEP.match(ln)]
    if not steps:
        return Extracted(reason="no VAR=MODULE(...) steps in the completion")
    repaired = None
    last = _STEP.match(steps[-1])
    assert last is not None
    if last.group(2) != "RESULT":
        steps.append(f"FINAL_RESULT=RESULT(var={last.group(1)})")
        repaired = "added the final RESULT step"
    program = "\n".join(steps)
    err = check_visprog(program)
    if err:
        return Extracted(program=program, reason=f"visprog: {err}")
    return Extracted(program=program + "\n", valid=True, repaired=repaired)


def extract_program(text: str, syntax: str) -> Extracted:
    """The program in ``text`` for ``syntax`` (viper|visprog); never raises on bad text."""
    if not text.strip():
        return Extracted(reason="empty completion")
    return extract_visprog(text) if syntax == "visprog" else extract_viper(text)
