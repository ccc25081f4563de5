"""VisProg-style step programs, parsed and run on the same ImagePatch API.

A program is one step per line, ``VAR=MODULE(arg=value, ...)``, values being string
literals, numbers or earlier variables; ``IMAGE`` is the input image::

    BOX0=LOC(image=IMAGE,object='red circle')
    IMAGE0=CROP_LEFTOF(image=IMAGE,box=BOX0)
    BOX1=LOC(image=IMAGE0,object='shape')
    ANSWER0=COUNT(box=BOX1)
    ANSWER1=EVAL(expr="'yes' if {ANSWER0} > 0 else 'no'")
    FINAL_RESULT=RESULT(var=ANSWER1)

Modules: ``LOC(image, object)`` -> boxes (``object`` = 'TOP'/'BOTTOM'/'LEFT'/'RIGHT' gives
that half of the image); ``COUNT(box)`` -> int; ``CROP(image, box)`` -> the first box's
region (the whole image when there is none); ``CROP_LEFTOF / CROP_RIGHTOF / CROP_ABOVE /
CROP_BELOW(image, box)`` -> the part of the image on that side of the first box's centre;
``VQA(image, question)`` -> str; ``EVAL(expr)`` -> value of a safe expression after each
``{VAR}`` is replaced by its value (literals, arithmetic, comparisons, and/or/not, ``x if
c else y``; no names, calls or attributes; 'yes'/'no' read as booleans, booleans come out
as 'yes'/'no'); ``RESULT(var)`` -> the final answer. Every step maps onto ImagePatch
methods, so tool calls are traced exactly like a ViperGPT program's.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_STEPS = 200
MAX_LINE = 2000

# module -> {arg: kind}; kind "var" = an earlier variable, "str" = a string literal
MODULES: dict[str, dict[str, str]] = {
    "LOC": {"image": "var", "object": "str"},
    "COUNT": {"box": "var"},
    "CROP": {"image": "var", "box": "var"},
    "CROP_LEFTOF": {"image": "var", "box": "var"},
    "CROP_RIGHTOF": {"image": "var", "box": "var"},
    "CROP_ABOVE": {"image": "var", "box": "var"},
    "CROP_BELOW": {"image": "var", "box": "var"},
    "VQA": {"image": "var", "question": "str"},
    "EVAL": {"expr": "str"},
    "RESULT": {"var": "var"},
}


class VisProgError(ValueError):
    """A syntax error (from the parser) or a step that cannot run (from the interpreter)."""


@dataclass(frozen=True)
class Step:
    line: int
    out: str
    module: str
    args: dict[str, Any]  # str/int/float literal, or _Var


@dataclass(frozen=True)
class _Var:
    name: str


# ----------------------------------------------------------------------------- parser


def parse_visprog(text: str) -> list[Step]:
    """Steps of a VisProg program, or :class:`VisProgError` with the line and the reason."""
    if not isinstance(text, str) or not text.strip():
        raise VisProgError("empty VisProg program")
    steps: list[Step] = []
    defined = {"IMAGE"}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            raise VisProgError(f"line {n}: step too long")
        if len(steps) >= MAX_STEPS:
            raise VisProgError(f"more than {MAX_STEPS} steps")
        step = _parse_line(line, n, defined)
        defined.add(step.out)
        steps.append(step)
    if not steps or steps[-1].module != "RESULT":
        raise VisProgError("the program must end with FINAL_RESULT=RESULT(var=...)")
    return steps


def _parse_line(line: str, n: int, defined: set[str]) -> Step:
    try:
        tree = ast.parse(line, mode="exec")
    except SyntaxError as e:
        raise VisProgError(f"line {n}: not a step VAR=MODULE(arg=value,...): {e.msg}") from None
    node = tree.body[0] if len(tree.body) == 1 else None
    if (
        not isinstance(node, ast.Assign)
        or len(node.targets) != 1
        or not isinstance(node.targets[0], ast.Name)
        or not isinstance(node.value, ast.Call)
        or not isinstance(node.value.func, ast.Name)
    ):
        raise VisProgError(f"line {n}: not a step VAR=MODULE(arg=value,...)")
    out, call = node.targets[0].id, node.value
    module = call.func.id  # type: ignore[union-attr]
    spec = MODULES.get(module)
    if spec is None:
        raise VisProgError(f"line {n}: unknown module {module!r} (known: {', '.join(MODULES)})")
    if call.args:
        raise VisProgError(f"line {n}: {module} takes keyword arguments only (arg=value)")
    args: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None or kw.arg not in spec:
            raise VisProgError(f"line {n}: {module} has no argument {kw.arg!r}")
        v = kw.value
        if spec[kw.arg] == "var":
            if not isinstance(v, ast.Name):
                raise VisProgError(f"line {n}: {module}({kw.arg}=...) must be a variable")
            if v.id not in defined:
                raise VisProgError(f"line {n}: variable {v.id} is used before it is defined")
            args[kw.arg] = _Var(v.id)
        else:
            if not isinstance(v, ast.Constant) or not isinstance(v.value, str):
                raise VisProgError(f"line {n}: {module}({kw.arg}=...) must be a quoted string")
            args[kw.arg] = v.value
    missing = [a for a in spec if a not in args]
    if missing:
        raise VisProgError(f"line {n}: {module} needs argument(s) {', '.join(missing)}")
    if module == "EVAL":
        for name in re.findall(r"\{(\w+)\}", args["expr"]):
            if name not in defined:
                raise VisProgError(f"line {n}: variable {name} is used before it is defined")
        _check_expr(_substitute(args["expr"], lambda name: 0), n)
    return Step(n, out, module, args)


def check_visprog(text: str) -> str | None:
    """None if ``text`` is a well-formed VisProg program, else a one-line reason."""
    try:
        parse_visprog(text)
    except VisProgError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- EVAL

_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CMP = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_EXPR = 500


def _literal(value: Any) -> str:
    """A step value as source text for EVAL ('yes'/'no' -> booleans, digits -> numbers)."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return repr(len(value))  # a list of boxes counts as its length
    s = str(value).strip()
    if s.lower() in ("yes", "no"):
        return repr(s.lower() == "yes")
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return s
    return repr(s)


def _substitute(expr: str, value_of: Callable[[str], Any]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: _literal(value_of(m.group(1))), expr)


def _check_expr(src: str, line: int) -> ast.expr:
    if len(src) > MAX_EXPR:
        raise VisProgError(f"line {line}: EVAL expression too long")
    src = re.sub(r"\bxor\b", "!=", src)  # VisProg writes 'xor' for boolean exclusive or
    try:
        tree = ast.parse(src.strip(), mode="eval").body
    except SyntaxError as e:
        raise VisProgError(f"line {line}: bad EVAL expression: {e.msg}") from None
    for node in ast.walk(tree):
        ok = (
            isinstance(
                node,
                (
                    ast.Constant,
                    ast.BinOp,
                    ast.UnaryOp,
                    ast.BoolOp,
                    ast.Compare,
                    ast.IfExp,
                    ast.And,
                    ast.Or,
                    ast.Load,
                ),
            )
            or type(node) in _BIN
            or type(node) in _CMP
            or type(node) in _UNARY
        )
        if not ok:
            raise VisProgError(
                f"line {line}: EVAL allows only literals, arithmetic, comparisons, and/or/not "
                f"and 'x if c else y' (found {type(node).__name__})"
            )
    return tree


def safe_eval(expr: str, line: int = 0) -> Any:
    """Evaluate an EVAL expression (already substituted) without names, calls, attributes."""
    return _eval(_check_expr(expr, line), line)


def _eval(node: ast.expr, line: int) -> Any:
    try:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp):
            left, right = _eval(node.left, line), _eval(node.right, line)
            if isinstance(node.op, ast.Mult) and (isinstance(left, str) or isinstance(right, str)):
                raise VisProgError(f"line {line}: EVAL cannot repeat strings")
            return _BIN[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](_eval(node.operand, line))
        if isinstance(node, ast.BoolOp):
            vals = (_eval(v, line) for v in node.values)
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.Compare):
            left = _eval(node.left, line)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                right = _eval(comp, line)
                if not _CMP[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            test = _eval(node.test, line)
            return _eval(node.body, line) if test else _eval(node.orelse, line)
    except (TypeError, ZeroDivisionError, ArithmeticError) as e:
        raise VisProgError(f"line {line}: EVAL failed: {e}") from None
    raise VisProgError(f"line {line}: EVAL cannot evaluate {type(node).__name__}")


# ----------------------------------------------------------------------------- interpreter


def run_visprog(text: str, namespace_or_image_patch_factory: Any) -> Any:
    """Run a VisProg program on the image; returns the RESULT value (booleans as yes/no).

    ``namespace_or_image_patch_factory``: a namespace from
    :func:`vpd.tools.api.build_namespace` or a callable returning the whole-image patch.
    """
    src = namespace_or_image_patch_factory
    factory = src["_root_patch"] if isinstance(src, dict) else src
    if not callable(factory):
        raise TypeError("run_visprog needs a namespace or an image-patch factory")
    steps = parse_visprog(text)
    state: dict[str, Any] = {"IMAGE": factory()}
    for step in steps:
        args = {k: state[v.name] if isinstance(v, _Var) else v for k, v in step.args.items()}
        value = _run_step(step, args, state)
        if step.module == "RESULT":
            return "yes" if value is True else "no" if value is False else value
        state[step.out] = value
    raise VisProgError("the program has no RESULT step")  # parse_visprog prevents this


def _patch(v: Any, step: Step, arg: str) -> Any:
    from vpd.tools.api import ImagePatch

    if not isinstance(v, ImagePatch):
        raise VisProgError(f"line {step.line}: {step.module}({arg}=...) must be an image")
    return v


def _boxes(v: Any, step: Step) -> list[Any]:
    from vpd.tools.api import ImagePatch

    if not isinstance(v, list) or not all(isinstance(b, ImagePatch) for b in v):
        raise VisProgError(f"line {step.line}: {step.module}(box=...) must be the output of LOC")
    return v


def _run_step(step: Step, a: dict[str, Any], state: dict[str, Any]) -> Any:
    m = step.module
    if m == "LOC":
        img = _patch(a["image"], step, "image")
        half = a["object"].strip().upper()
        w, h = img.width, img.height
        halves = {
            "TOP": (0, h // 2, w, h),
            "BOTTOM": (0, 0, w, h // 2),
            "LEFT": (0, 0, w // 2, h),
            "RIGHT": (w // 2, 0, w, h),
        }
        if half in halves:
            return [img.crop(*halves[half])]
        return img.find(a["object"])
    if m == "COUNT":
        return len(_boxes(a["box"], step))
    if m.startswith("CROP"):
        img = _patch(a["image"], step, "image")
        boxes = _boxes(a["box"], step)
        if not boxes:
            return img  # VisProg: nothing to crop around -> the whole image
        b = boxes[0]
        # Coordinates relative to img, as crop() expects.
        x, y = b.horizontal_center - img.left, b.vertical_center - img.lower
        w, h = img.width, img.height
        region = {
            "CROP": (
                b.left - img.left,
                b.lower - img.lower,
                b.right - img.left,
                b.upper - img.lower,
            ),
            "CROP_LEFTOF": (0, 0, x, h),
            "CROP_RIGHTOF": (x, 0, w, h),
            "CROP_ABOVE": (0, y, w, h),
            "CROP_BELOW": (0, 0, w, y),
        }[m]
        return img.crop(*region)
    if m == "VQA":
        return _patch(a["image"], step, "image").simple_query(a["question"])
    if m == "EVAL":
        value = safe_eval(_substitute(a["expr"], lambda name: state[name]), step.line)
        return "yes" if value is True else "no" if value is False else value
    if m == "RESULT":
        return a["var"]
    raise VisProgError(f"line {step.line}: unknown module {m!r}")
