"""VisProg-style step programs, parsed and run on the same ImagePatch API.

A program is one step per line, ``VAR=MODULE(arg=value, ...)``, values being string
literals, numbers or earlier variables; ``IMAGE`` is the input image, and a two-image
question (NLVR2) has ``LEFT`` and ``RIGHT`` instead, as in VisProg's NLVR programs::

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

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vpd.tools.api import ImagePatch

MAX_STEPS = 200
MAX_LINE = 2000
# The image variables, by number of images of the question. The parser accepts all of
# them (a program is checked before its question's images are known); running a program
# that names an image its question lacks is a step error.
IMAGE_VARS: dict[int, tuple[str, ...]] = {1: ("IMAGE",), 2: ("LEFT", "RIGHT")}

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


# ----------------------------------------------------------------------------- tokens
# A hand-written scanner and parser, not ``ast``: the interpreter runs inside the sandbox,
# whose audit hook refuses ``compile`` (which ``ast.parse`` is) once the program runs.

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<num>\d+(?:\.\d*)?|\.\d+)
    | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<name>[A-Za-z_]\w*)
    | (?P<op>//|==|!=|<=|>=|[-+*/%<>()=,])
    )""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}


def _tokenize(src: str, line: int) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    src = src.rstrip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None or m.end() == pos:
            raise VisProgError(f"line {line}: unexpected text {src[pos : pos + 20].strip()!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        text = m.group(kind)
        if kind == "num":
            out.append(("num", float(text) if "." in text else int(text)))
        elif kind == "str":
            body = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(0)), text[1:-1])
            out.append(("str", body))
        else:
            out.append((kind, text))
    return out


# ----------------------------------------------------------------------------- parser


def parse_visprog(text: str) -> list[Step]:
    """Steps of a VisProg program, or :class:`VisProgError` with the line and the reason."""
    if not isinstance(text, str) or not text.strip():
        raise VisProgError("empty VisProg program")
    steps: list[Step] = []
    defined = {name for names in IMAGE_VARS.values() for name in names}
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
    toks = _tokenize(line, n)
    shape_ok = (
        len(toks) >= 5
        and toks[0][0] == "name"
        and toks[1] == ("op", "=")
        and toks[2][0] == "name"
        and toks[3] == ("op", "(")
        and toks[-1] == ("op", ")")
    )
    if not shape_ok:
        raise VisProgError(f"line {n}: not a step VAR=MODULE(arg=value,...)")
    out, module = toks[0][1], toks[2][1]
    spec = MODULES.get(module)
    if spec is None:
        raise VisProgError(f"line {n}: unknown module {module!r} (known: {', '.join(MODULES)})")
    args: dict[str, Any] = {}
    body = toks[4:-1]
    i = 0
    while i < len(body):
        if body[i][0] != "name" or i + 1 >= len(body) or body[i + 1] != ("op", "="):
            raise VisProgError(f"line {n}: {module} takes arguments as arg=value")
        if i + 2 >= len(body):
            raise VisProgError(f"line {n}: {module}({body[i][1]}=) has no value")
        name, (kind, value) = body[i][1], body[i + 2]
        if name not in spec:
            raise VisProgError(f"line {n}: {module} has no argument {name!r}")
        if name in args:
            raise VisProgError(f"line {n}: {module}({name}=...) given twice")
        if spec[name] == "var":
            if kind != "name":
                raise VisProgError(f"line {n}: {module}({name}=...) must be a variable")
            if value not in defined:
                raise VisProgError(f"line {n}: variable {value} is used before it is defined")
            args[name] = _Var(value)
        else:
            if kind != "str":
                raise VisProgError(f"line {n}: {module}({name}=...) must be a quoted string")
            args[name] = value
        i += 3
        if i < len(body):
            if body[i] != ("op", ","):
                raise VisProgError(f"line {n}: expected ',' between {module} arguments")
            i += 1
    missing = [a for a in spec if a not in args]
    if missing:
        raise VisProgError(f"line {n}: {module} needs argument(s) {', '.join(missing)}")
    if module == "EVAL":
        for name in re.findall(r"\{(\w+)\}", args["expr"]):
            if name not in defined:
                raise VisProgError(f"line {n}: variable {name} is used before it is defined")
        _Expr(_substitute(args["expr"], lambda name: 0), n).parse()  # syntax only
    return Step(n, out, module, args)


def check_visprog(text: str) -> str | None:
    """None if ``text`` is a well-formed VisProg program, else a one-line reason."""
    try:
        parse_visprog(text)
    except VisProgError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- EVAL

MAX_EXPR = 500
_ARITH = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
}
_CMP = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_CONST = {"True": True, "False": False, "None": None, "true": True, "false": False}


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


Thunk = Callable[[], Any]


class _Expr:
    """Recursive-descent parser of Python-like expressions over literals only:
    ``x if c else y``, or/xor/and/not, comparisons (chained), + - * / // %, unary -/+,
    parentheses. No names, calls, attributes or subscripts exist in this grammar. It
    builds thunks, so and/or/if evaluate lazily as in Python and parsing alone is a
    syntax check."""

    def __init__(self, src: str, line: int) -> None:
        if len(src) > MAX_EXPR:
            raise VisProgError(f"line {line}: EVAL expression too long")
        self.toks = _tokenize(src, line)
        self.i = 0
        self.line = line
        self.depth = 0

    def error(self, why: str) -> VisProgError:
        return VisProgError(f"line {self.line}: bad EVAL expression: {why}")

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, *values: str) -> str | None:
        t = self.peek()
        if t is not None and t[0] in ("op", "name") and t[1] in values:
            self.i += 1
            return t[1]
        return None

    def parse(self) -> Thunk:
        v = self.ifexp()
        t = self.peek()
        if t is not None:
            raise self.error(f"unexpected {t[1]!r}")
        return v

    def ifexp(self) -> Thunk:
        self.depth += 1
        if self.depth > 50:
            raise self.error("nested too deeply")
        body = self.orexp()
        if self.take("if"):
            test = self.orexp()
            if not self.take("else"):
                raise self.error("'if' without 'else'")
            other = self.ifexp()
            body = _if(test, body, other)
        self.depth -= 1
        return body

    def orexp(self) -> Thunk:
        v = self.andexp()
        while op := self.take("or", "xor"):
            v = _or(v, self.andexp()) if op == "or" else _xor(v, self.andexp())
        return v

    def andexp(self) -> Thunk:
        v = self.notexp()
        while self.take("and"):
            v = _and(v, self.notexp())
        return v

    def notexp(self) -> Thunk:
        if self.take("not"):
            inner = self.notexp()
            return lambda: not inner()
        return self.comparison()

    def comparison(self) -> Thunk:
        terms = [self.arith()]
        ops: list[str] = []
        while op := self.take(*_CMP):
            ops.append(op)
            terms.append(self.arith())
        if not ops:
            return terms[0]
        return self.chain(terms, ops)

    def chain(self, terms: list[Thunk], ops: list[str]) -> Thunk:
        def run() -> bool:
            left = terms[0]()
            for op, t in zip(ops, terms[1:], strict=True):
                right = t()
                if not self.apply(_CMP[op], left, right):
                    return False
                left = right
            return True

        return run

    def arith(self) -> Thunk:
        v = self.term()
        while op := self.take("+", "-"):
            v = self.binary(op, v, self.term())
        return v

    def term(self) -> Thunk:
        v = self.unary()
        while op := self.take("*", "/", "//", "%"):
            v = self.binary(op, v, self.unary())
        return v

    def binary(self, op: str, a: Thunk, b: Thunk) -> Thunk:
        def run() -> Any:
            x, y = a(), b()
            if op == "*" and (isinstance(x, str) or isinstance(y, str)):
                raise VisProgError(f"line {self.line}: EVAL cannot repeat strings")
            return self.apply(_ARITH[op], x, y)

        return run

    def unary(self) -> Thunk:
        if op := self.take("-", "+"):
            inner = self.unary()
            fn = operator.neg if op == "-" else operator.pos
            return lambda: self.apply(fn, inner())
        return self.atom()

    def atom(self) -> Thunk:
        t = self.peek()
        if t is None:
            raise self.error("unexpected end")
        self.i += 1
        kind, value = t
        if kind in ("num", "str"):
            return lambda: value
        if kind == "name" and value in _CONST:
            const = _CONST[value]
            return lambda: const
        if t == ("op", "("):
            v = self.ifexp()
            if not self.take(")"):
                raise self.error("missing ')'")
            return v
        raise self.error(f"{value!r} is not allowed (only literals and operators)")

    def apply(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except (TypeError, ArithmeticError) as e:
            raise VisProgError(f"line {self.line}: EVAL failed: {e}") from None


def _if(test: Thunk, body: Thunk, other: Thunk) -> Thunk:
    return lambda: body() if test() else other()


def _or(a: Thunk, b: Thunk) -> Thunk:
    return lambda: a() or b()


def _and(a: Thunk, b: Thunk) -> Thunk:
    return lambda: a() and b()


def _xor(a: Thunk, b: Thunk) -> Thunk:
    return lambda: bool(a()) != bool(b())


def safe_eval(expr: str, line: int = 0) -> Any:
    """Evaluate an EVAL expression (already substituted): literals and operators only."""
    return _Expr(expr, line).parse()()


# ----------------------------------------------------------------------------- interpreter


def run_visprog(text: str, images: Any) -> Any:
    """Run a VisProg program on a question's images; returns the RESULT value (booleans as
    yes/no).

    ``images``: the whole-image patches in order (one: ``IMAGE``; two: ``LEFT``,
    ``RIGHT``), or, for one image, a namespace from
    :func:`vpd.tools.namespace.build_namespace` or a callable returning the image patch.
    """
    if isinstance(images, dict):
        images = [images["_root_patch"]()]
    elif callable(images):
        images = [images()]
    if not isinstance(images, list | tuple) or not all(isinstance(p, ImagePatch) for p in images):
        raise TypeError("run_visprog needs the image patches, a namespace or a patch factory")
    names = IMAGE_VARS.get(len(images))
    if names is None:
        raise VisProgError(f"VisProg programs take 1 or 2 images, this question has {len(images)}")
    steps = parse_visprog(text)
    state: dict[str, Any] = dict(zip(names, images, strict=True))
    image_names = {n for ns in IMAGE_VARS.values() for n in ns}
    for step in steps:
        for v in step.args.values():
            if isinstance(v, _Var) and v.name in image_names and v.name not in state:
                raise VisProgError(
                    f"line {step.line}: this question's images are {', '.join(names)}, not {v.name}"
                )
        args = {k: state[v.name] if isinstance(v, _Var) else v for k, v in step.args.items()}
        value = _run_step(step, args, state)
        if step.module == "RESULT":
            return "yes" if value is True else "no" if value is False else value
        state[step.out] = value
    raise VisProgError("the program has no RESULT step")  # parse_visprog prevents this


def _patch(v: Any, step: Step, arg: str) -> Any:
    if not isinstance(v, ImagePatch):
        raise VisProgError(f"line {step.line}: {step.module}({arg}=...) must be an image")
    return v


def _boxes(v: Any, step: Step) -> list[Any]:
    if not isinstance(v, list) or not all(isinstance(b, ImagePatch) for b in v):
        raise VisProgError(f"line {step.line}: {step.module}(box=...) must be the output of LOC")
    return v


def _run_step(step: Step, a: dict[str, Any], state: dict[str, Any]) -> Any:
    m = step.module
    if m == "LOC":
        img = _patch(a["image"], step, "image")
        half = a["object"].strip().upper()
        if half not in ("TOP", "BOTTOM", "LEFT", "RIGHT"):
            return img.find(a["object"])
        w, h = img.width, img.height
        halves = {
            "TOP": (0, h // 2, w, h),
            "BOTTOM": (0, 0, w, h // 2),
            "LEFT": (0, 0, w // 2, h),
            "RIGHT": (w // 2, 0, w, h),
        }
        return [img.crop(*halves[half])]
    if m == "COUNT":
        return len(_boxes(a["box"], step))
    if m.startswith("CROP"):
        img = _patch(a["image"], step, "image")
        boxes = _boxes(a["box"], step)
        if not boxes:
            return img  # VisProg: nothing to crop around -> the whole image
        b = boxes[0]
        # Coordinates relative to img, as crop() expects. The side crops hold what lies
        # strictly on that side of the box centre, so the box's own object is left out.
        x, y = b.horizontal_center - img.left, b.vertical_center - img.lower
        x0, y0 = math.floor(x), math.floor(y)
        w, h = img.width, img.height
        region = {
            "CROP": (
                b.left - img.left,
                b.lower - img.lower,
                b.right - img.left,
                b.upper - img.lower,
            ),
            "CROP_LEFTOF": (0, 0, x0, h),
            "CROP_RIGHTOF": (x0 + 1, 0, w, h),
            "CROP_ABOVE": (0, y0 + 1, w, h),
            "CROP_BELOW": (0, 0, w, y0),
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
