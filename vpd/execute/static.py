"""Static check of untrusted programs: an AST allowlist, run before anything executes.

The check is the first sandbox layer (see ``vpd.execute`` for the others). It parses
the source and accepts it only if every node type is on an allowlist and every name,
attribute and literal passes the rules below; otherwise it returns a one-line reason and
the program is recorded as ``violation`` without ever reaching a worker.

Rules (why, briefly):
- size/shape bounds first (source bytes, lines), so a hostile input cannot make the
  parser itself slow or crash; then node count and nesting depth;
- no import, class, async, global/nonlocal, with, yield, match, decorators: none are
  needed by ViperGPT-style programs and each opens a path to objects we do not control;
- no name or attribute starting with ``_`` (dunder walks such as
  ``().__class__.__bases__``), and no introspection attributes that need no underscore
  (``gi_frame``, ``tb_frame``, ``f_globals``, ``mro``...);
- banned builtins by name (exec, eval, getattr, type, vars, open, ...) even though the
  worker's builtins do not hold them: a second, independent guard;
- ``str.format``/``format_map`` only on a literal whose fields are plain positions or
  names (``"{0.__class__}".format(x)`` reaches attributes through the format mini-language);
- no attribute assignment/deletion (no monkeypatching of the tool API);
- default values and top-level statements are constants only, so defining the program
  runs no user code; annotations are dropped (they would be evaluated at definition);
- constant expressions are bounded (``9**9**9``, ``'a' * 10**10`` are refused here; the
  same thing computed from variables is stopped by the CPU/memory limits instead);
- the program must define ``execute_command(image)`` at top level.
"""

from __future__ import annotations

import ast
import math
import operator
import string
from dataclasses import dataclass, field

ENTRY = "execute_command"

MAX_SOURCE_BYTES = 64 * 1024
MAX_LINES = 2000
MAX_NODES = 20000
MAX_DEPTH = 40
MAX_STR_LITERAL = 10_000
MAX_INT_BITS = 1024
MAX_CONST_SEQ = 100_000  # length of a constant-folded str/bytes/tuple
MAX_ARGS = 64

# Node types a program may contain (Python 3.11+ AST). Everything else is a violation.
_ALLOWED: frozenset[type] = frozenset(
    {
        ast.Module,
        ast.FunctionDef,
        ast.arguments,
        ast.arg,
        ast.Return,
        ast.Delete,
        ast.Assign,
        ast.AugAssign,
        ast.AnnAssign,
        ast.For,
        ast.While,
        ast.If,
        ast.Raise,
        ast.Try,
        ast.ExceptHandler,
        ast.Assert,
        ast.Pass,
        ast.Break,
        ast.Continue,
        ast.Expr,
        ast.BoolOp,
        ast.NamedExpr,
        ast.BinOp,
        ast.UnaryOp,
        ast.Lambda,
        ast.IfExp,
        ast.Dict,
        ast.Set,
        ast.ListComp,
        ast.SetComp,
        ast.DictComp,
        ast.GeneratorExp,
        ast.Compare,
        ast.Call,
        ast.keyword,
        ast.FormattedValue,
        ast.JoinedStr,
        ast.Constant,
        ast.Attribute,
        ast.Subscript,
        ast.Starred,
        ast.Name,
        ast.List,
        ast.Tuple,
        ast.Slice,
        ast.comprehension,
        ast.Load,
        ast.Store,
        ast.Del,
        ast.And,
        ast.Or,
        ast.Add,
        ast.Sub,
        ast.Mult,
        ast.Div,
        ast.Mod,
        ast.Pow,
        ast.LShift,
        ast.RShift,
        ast.BitOr,
        ast.BitXor,
        ast.BitAnd,
        ast.FloorDiv,
        ast.Invert,
        ast.Not,
        ast.UAdd,
        ast.USub,
        ast.Eq,
        ast.NotEq,
        ast.Lt,
        ast.LtE,
        ast.Gt,
        ast.GtE,
        ast.Is,
        ast.IsNot,
        ast.In,
        ast.NotIn,
    }
)

# Builtins and names that give reflection, code execution, I/O or process control.
BANNED_NAMES: frozenset[str] = frozenset(
    {
        "exec",
        "eval",
        "compile",
        "open",
        "getattr",
        "setattr",
        "delattr",
        "hasattr",
        "globals",
        "locals",
        "vars",
        "dir",
        "type",
        "super",
        "object",
        "breakpoint",
        "input",
        "memoryview",
        "bytearray",
        "help",
        "exit",
        "quit",
        "copyright",
        "credits",
        "license",
        "classmethod",
        "staticmethod",
        "property",
        "id",
        "callable",
        "issubclass",
        "builtins",
        "sys",
        "os",
        "io",
        "importlib",
        "subprocess",
        "socket",
        "signal",
        "ctypes",
        "gc",
        "inspect",
        "code",
        "codecs",
        "pickle",
        "marshal",
        "shutil",
        "pathlib",
        "Path",
    }
)

# Attributes without an underscore that still lead to frames, code, classes or globals.
BANNED_ATTRS: frozenset[str] = frozenset(
    {
        "mro",
        "format_map",
        "with_traceback",
        "func_globals",
        "func_code",
        "im_func",
        "im_self",
        "im_class",
        "throw",
        "send",
        "close",
        "globals",
        "builtins",
        "modules",
        "system",
        "popen",
        "fork",
        "spawn",
        "load",
        "loads",
        "dump",
        "dumps",
        "register",
    }
)
BANNED_ATTR_PREFIXES: tuple[str, ...] = ("_", "gi_", "cr_", "ag_", "tb_", "f_", "co_", "func_")


class Violation(Exception):
    """A rule broken; ``str(e)`` is the one-line reason (with the line number)."""


@dataclass
class StaticResult:
    ok: bool
    reason: str = ""
    tree: ast.Module | None = field(default=None, repr=False)


def _where(node: ast.AST) -> str:
    line = getattr(node, "lineno", None)
    return f" (line {line})" if line else ""


def _fail(node: ast.AST, msg: str) -> None:
    raise Violation(msg + _where(node))


def _check_format_literal(node: ast.AST, text: str) -> None:
    """Allow ``"{0} {name:>5}".format(...)`` but not fields that reach attributes/items."""
    pending = [text]
    while pending:
        s = pending.pop()
        try:
            parts = list(string.Formatter().parse(s))
        except ValueError as e:
            _fail(node, f"bad format string: {e}")
        for _lit, fname, spec, _conv in parts:
            if fname is not None and ("." in fname or "[" in fname):
                _fail(node, f"format field {fname!r} reaches an attribute or item")
            if spec:
                pending.append(spec)  # nested fields in the spec are fields too


def _const_value(node: ast.AST) -> object:
    """Value of a constant sub-expression, or ``_NOT_CONST``; refuses huge results."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Invert)):
        v = _const_value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
        return _NOT_CONST
    if isinstance(node, ast.Tuple):
        vals = [_const_value(e) for e in node.elts]
        return _NOT_CONST if any(v is _NOT_CONST for v in vals) else tuple(vals)
    if isinstance(node, ast.BinOp):
        a, b = _const_value(node.left), _const_value(node.right)
        if a is _NOT_CONST or b is _NOT_CONST:
            return _NOT_CONST
        return _fold(node, a, b)
    return _NOT_CONST


_NOT_CONST = object()


def _bits(x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return 0.0
    return math.log2(abs(x)) if abs(x) > 1 else 0.0


def _fold(node: ast.BinOp, a: object, b: object) -> object:
    op = node.op
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if isinstance(op, ast.Pow) and nums:
        if _bits(a) * max(float(b), 0.0) > MAX_INT_BITS:  # type: ignore[arg-type]
            _fail(node, "constant expression too large (power)")
    elif isinstance(op, ast.LShift) and nums:
        if isinstance(b, int) and b + _bits(a) > MAX_INT_BITS:
            _fail(node, "constant expression too large (shift)")
    elif isinstance(op, ast.Mult):
        for seq, n in ((a, b), (b, a)):
            if isinstance(seq, (str, bytes, tuple)) and isinstance(n, int):
                if len(seq) * n > MAX_CONST_SEQ:
                    _fail(node, "constant expression too large (repetition)")
        if nums and _bits(a) + _bits(b) > MAX_INT_BITS:
            _fail(node, "constant expression too large (product)")
    fn = _BINOPS.get(type(op))
    if fn is None:
        return _NOT_CONST
    try:
        return fn(a, b)  # small now, by the checks above; bounds enclosing expressions
    except Exception:
        return _NOT_CONST  # e.g. 1/0: an ordinary runtime error, not a violation


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_,
    ast.BitXor: operator.xor,
}


def _is_literal(node: ast.AST) -> bool:
    """Constants and containers of constants (allowed as defaults and top-level values)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_literal(k) for k in node.keys) and all(
            _is_literal(v) for v in node.values
        )
    return False


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.nodes = 0
        self.depth = 0

    def generic_visit(self, node: ast.AST) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            _fail(node, f"program too large (more than {MAX_NODES} syntax nodes)")
        if type(node) not in _ALLOWED:
            _fail(node, f"{type(node).__name__} is not allowed")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            _fail(node, f"program nested too deeply (more than {MAX_DEPTH} levels)")
        self._rules(node)
        super().generic_visit(node)
        self.depth -= 1

    def _name(self, node: ast.AST, name: str, what: str) -> None:
        if name.startswith("_"):
            _fail(node, f"{what} {name!r} starts with an underscore")
        if name in BANNED_NAMES:
            _fail(node, f"{what} {name!r} is not allowed")

    def _rules(self, node: ast.AST) -> None:
        if isinstance(node, ast.Name):
            self._name(node, node.id, "name")
        elif isinstance(node, ast.arg):
            self._name(node, node.arg, "argument")
        elif isinstance(node, ast.keyword):
            if node.arg is not None:
                self._name(node, node.arg, "keyword")
        elif isinstance(node, ast.ExceptHandler):
            if node.name is not None:
                self._name(node, node.name, "name")
        elif isinstance(node, ast.FunctionDef):
            self._name(node, node.name, "function")
            if node.decorator_list:
                _fail(node, "decorators are not allowed")
        elif isinstance(node, ast.Attribute):
            a = node.attr
            if a.startswith(BANNED_ATTR_PREFIXES) or a in BANNED_ATTRS:
                _fail(node, f"attribute {a!r} is not allowed")
            if not isinstance(node.ctx, ast.Load):
                _fail(node, f"assigning or deleting attribute {a!r} is not allowed")
            if a == "format":
                if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                    _fail(node, ".format() is only allowed on a string literal")
                _check_format_literal(node, node.value.value)
        elif isinstance(node, ast.arguments):
            if len(node.posonlyargs) + len(node.args) + len(node.kwonlyargs) > MAX_ARGS:
                _fail(node, "too many arguments")
            for d in [*node.defaults, *(d for d in node.kw_defaults if d is not None)]:
                if not _is_literal(d):
                    _fail(d, "default values must be constants")
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, (str, bytes)) and len(v) > MAX_STR_LITERAL:
                _fail(node, f"literal longer than {MAX_STR_LITERAL} characters")
            if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
                _fail(node, "integer literal too large")
        elif isinstance(node, ast.FormattedValue):
            if node.format_spec is not None:
                for v in ast.walk(node.format_spec):
                    if isinstance(v, ast.FormattedValue):
                        _fail(node, "nested fields in an f-string format spec are not allowed")
        elif isinstance(node, ast.BinOp):
            _const_value(node)  # raises on huge constant expressions
        elif isinstance(node, ast.Delete):
            for t in node.targets:
                if not isinstance(t, (ast.Name, ast.Subscript)):
                    _fail(node, "only names and items may be deleted")


class _StripAnnotations(ast.NodeTransformer):
    """Annotations would be evaluated when a function is defined; they mean nothing here."""

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is None:
            return ast.copy_location(ast.Pass(), node)
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


def _check_top_level(tree: ast.Module) -> None:
    entry = None
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef):
            if stmt.name == ENTRY:
                entry = stmt
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # docstring / stray literal
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Assign) and _is_literal(stmt.value):
            if all(isinstance(t, ast.Name) for t in stmt.targets):
                continue
        _fail(stmt, "top-level code other than function definitions and constants")
    if entry is None:
        raise Violation(f"the program must define {ENTRY}(image)")
    a = entry.args
    if not (a.posonlyargs or a.args or a.vararg):
        _fail(entry, f"{ENTRY} must take the image as its first argument")


def check_program(source: str) -> StaticResult:
    """Check ``source``; on success ``tree`` is the annotation-free AST to compile."""
    if not isinstance(source, str):
        return StaticResult(False, "program is not text")
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        return StaticResult(False, f"program larger than {MAX_SOURCE_BYTES} bytes")
    if source.count("\n") > MAX_LINES:
        return StaticResult(False, f"program longer than {MAX_LINES} lines")
    if "\x00" in source:
        return StaticResult(False, "program contains a NUL byte")
    try:
        tree = ast.parse(source, "<program>", "exec")
    except SyntaxError as e:
        return StaticResult(False, f"syntax error: {e.msg} (line {e.lineno})")
    except (MemoryError, RecursionError, ValueError):
        return StaticResult(False, "program too deeply nested to parse")
    try:
        _Checker().visit(tree)
        _check_top_level(tree)
    except Violation as e:
        return StaticResult(False, str(e))
    except RecursionError:
        return StaticResult(False, "program nested too deeply")
    tree = _StripAnnotations().visit(tree)
    ast.fix_missing_locations(tree)
    return StaticResult(True, "", tree)
