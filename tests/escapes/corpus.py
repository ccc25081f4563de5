"""Escape attempts: each entry is (name, program, statuses it may end with).

Every attempt must end as violation/error/timeout/oom/crash: never ``ok``. The
programs are written the way a hostile or confused LLM would write them.
"""

from __future__ import annotations

BAD = {"violation", "error", "timeout", "oom", "crash"}
V = {"violation"}


def _fn(body: str) -> str:
    lines = body.strip("\n").splitlines()
    return "def execute_command(image):\n" + "\n".join("    " + ln for ln in lines) + "\n"


ESCAPES: list[tuple[str, str, set[str]]] = [
    # --- imports in every form
    ("import", "import os\n" + _fn("return os.listdir('/')"), V),
    ("import_from", "from os import system\n" + _fn("return system('id')"), V),
    ("import_inside", _fn("import subprocess\nreturn subprocess.check_output('id')"), V),
    ("import_as", _fn("import builtins as b\nreturn b.open('/etc/passwd').read()"), V),
    ("dunder_import", _fn("return __import__('os').system('id')"), V),
    ("builtins_dict", _fn("return __builtins__['__import__']('os')"), V),
    ("importlib", _fn("return importlib.import_module('os')"), V),
    # --- dunder walks
    ("subclasses", _fn("return ().__class__.__bases__[0].__subclasses__()"), V),
    ("subclasses_comp", _fn("return [c for c in ().__class__.__base__.__subclasses__()]"), V),
    ("func_globals", _fn("return image.find.__globals__['__builtins__']"), V),
    ("init_globals", _fn("return image.__class__.__init__.__globals__"), V),
    ("bound_self", _fn("return sorted.__self__.open('/etc/passwd')"), V),
    ("dict_walk", _fn("return image.__dict__"), V),
    ("mro", _fn("return str.mro()[-1]"), V),
    # --- frame walks
    ("gen_frame", _fn("g = (x for x in [1])\nreturn g.gi_frame.f_back.f_globals"), V),
    ("gen_code", _fn("return (g := (i for i in [1])).gi_code"), V),
    (
        "tb_frame",
        _fn("try:\n    1 / 0\nexcept Exception as e:\n    return e.__traceback__.tb_frame"),
        V,
    ),
    (
        "with_traceback",
        _fn("try:\n    1 / 0\nexcept Exception as e:\n    e.with_traceback(None)"),
        V,
    ),
    ("yield_gen", "def g():\n    yield 1\n" + _fn("return next(g())"), V),
    # --- format strings
    ("format_attr", _fn("return '{0.__class__}'.format(image)"), V),
    ("format_item", _fn("return '{0[0]}'.format(['x'])"), V),
    ("format_nested_spec", _fn("return '{0:{1.__class__}}'.format(1, 2)"), V),
    ("format_var", _fn("s = '{0.__class__}'\nreturn s.format(image)"), V),
    ("format_unbound", _fn("return str.format('{0.__class__}', 1)"), V),
    ("format_map", _fn("return '{x.__class__}'.format_map({'x': 1})"), V),
    ("fstring_dunder", _fn("return f'{image.__class__!r}'"), V),
    ("fstring_spec_field", _fn("return f'{1:{image}}'"), V),
    # --- classes, decorators, metaclasses
    ("class", "class A:\n    pass\n" + _fn("return A()"), V),
    ("metaclass", "class M(type):\n    pass\n" + _fn("return 1"), V),
    ("decorator", "def d(f):\n    return f\n@d\n" + _fn("return 1"), V),
    # --- tampering with the API and builtins
    ("monkeypatch", _fn("ImagePatch.find = lambda self, n: []\nreturn 1"), V),
    ("monkeypatch_inst", _fn("image.find = None\nreturn 1"), V),
    ("delattr", _fn("del image.find\nreturn 1"), V),
    ("setattr", _fn("setattr(ImagePatch, 'find', None)\nreturn 1"), V),
    ("getattr_str", _fn("return getattr(image, '__cl' + 'ass__')"), V),
    ("vars", _fn("return vars()"), V),
    ("globals", _fn("return globals()['__builtins__']"), V),
    ("locals", _fn("return locals()"), V),
    ("type", _fn("return type(image)"), V),
    ("global_stmt", "X = 1\n" + _fn("global X\nX = 2\nreturn X"), V),
    ("default_call", "def execute_command(image, x=print('hi')):\n    return x\n", V),
    ("top_level_code", "print('hi')\n" + _fn("return 1"), V),
    # --- code execution
    ("exec", _fn("exec('import os')\nreturn 1"), V),
    ("eval", _fn("return eval('1+1')"), V),
    ("compile", _fn("return compile('1', 'x', 'eval')"), V),
    ("breakpoint", _fn("breakpoint()\nreturn 1"), V),
    ("input", _fn("return input()"), V),
    ("memoryview", _fn("return memoryview(b'x')"), V),
    ("async", "async def execute_command(image):\n    return 1\n", V),
    ("match", _fn("match image:\n    case str(__class__=c):\n        return c\nreturn 1"), V),
    ("with", _fn("with open('/etc/passwd') as f:\n    return f.read()"), V),
    # --- files, network, processes, signals
    ("read_passwd", _fn("return open('/etc/passwd').read()"), V),
    ("write_tmp", _fn("open('/tmp/vpd_escape_marker', 'w').write('x')\nreturn 1"), V),
    ("socket", _fn("s = socket.socket()\ns.connect(('127.0.0.1', 80))\nreturn 1"), V),
    ("fork_bomb", _fn("while True:\n    os.fork()"), V),
    ("signal", _fn("signal.alarm(0)\nreturn 1"), V),
    ("os_system", _fn("return os.system('touch /tmp/vpd_escape_marker')"), V),
    # --- resource exhaustion
    ("loop", _fn("while True:\n    pass"), {"timeout"}),
    (
        "loop_swallow",
        _fn(
            "while True:\n    try:\n        while True:\n            pass\n"
            "    except:\n        pass"
        ),
        {"timeout"},
    ),
    ("huge_int_literal", _fn("return 10 ** 10 ** 8"), V),
    ("huge_pow_literal", _fn("return 9 ** 9 ** 9"), V),
    ("huge_int_runtime", _fn("n = 10\nreturn n ** (n ** 8) + 1"), {"timeout", "oom", "error"}),
    ("huge_str_literal", _fn("return 'a' * 10 ** 10"), V),
    ("huge_str_runtime", _fn("n = 10 ** 10\nreturn 'a' * n"), {"oom"}),
    ("huge_list_runtime", _fn("n = 10 ** 10\nreturn len([0] * n)"), {"oom"}),
    ("grow_list", _fn("x = []\nwhile True:\n    x.append('a' * 100000)"), {"oom", "timeout"}),
    ("recursion", "def f(n):\n    return f(n + 1)\n" + _fn("return f(0)"), {"error"}),
    ("lambda_recursion", _fn("f = lambda: f()\nreturn f()"), {"error"}),
    ("print_flood", _fn("while True:\n    print('x' * 1000)"), {"error"}),
    (
        "print_flood_swallow",
        _fn("while True:\n    try:\n        print('x' * 1000)\n    except:\n        pass"),
        {"error", "timeout"},
    ),
    ("tool_flood", _fn("for i in range(10 ** 6):\n    image.exists('x')\nreturn 1"), {"error"}),
    ("nested_parens", _fn("return " + "(" * 300 + "1" + ")" * 300), V),
    ("nested_lists", _fn("return " + "[" * 120 + "]" * 120), V),
    ("megabyte", _fn("x = 1\n" * 200_000 + "return x"), V),
    ("many_lines", _fn("\n".join(f"x{i} = {i}" for i in range(3000)) + "\nreturn 1"), V),
    ("no_entry", "def main(image):\n    return 1\n", V),
    ("syntax", "def execute_command(image)\n    return 1\n", V),
    ("return_patch", _fn("return image"), {"error"}),
    # --- a leaky tool API (test double): the runtime layers must still hold
    ("leak_open", _fn("return leaky_open('/etc/passwd')"), V),
    ("leak_write", _fn("return leaky_open('/tmp/vpd_escape_marker', 'w')"), V),
    ("leak_socket", _fn("return leaky_connect(PORT)"), V),
    ("leak_fork", _fn("return leaky_fork()"), V),
    ("leak_import", _fn("return leaky_import('shutil')"), V),
    ("leak_cached_module", _fn("return leaky_import('os').listdir('/')"), V),
    ("leak_cached_kill", _fn("return leaky_import('os').kill(1, 9)"), V),
]
