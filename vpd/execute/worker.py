"""Worker side of the sandbox: the zygote process and the per-program child.

The zygote is a small, fresh interpreter (started by :mod:`vpd.execute.pool` with a
scrubbed environment, never a fork of a process holding models or torch). It imports
the client-side tool API once, enters a new network namespace when it may, and then
forks one child per program on request. Each child locks itself down *before* it
reads the program (new session, closed fds, rlimits, chroot to an empty directory,
unprivileged uid, no-new-privs, parent-death signal), runs the program with a fresh
namespace and restricted builtins under an audit hook that refuses every runtime
event (imports, open, sockets, os.*, frame introspection...), reports the result as
JSON and exits. One process per program means no state can leak between programs.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import importlib
import json
import math
import os
import resource
import select
import signal
import socket
import sys
import types
from collections.abc import Callable
from typing import Any

from vpd.execute import wire
from vpd.execute.static import ENTRY, check_program

CONFIG_ENV = "VPD_ZYGOTE_CONFIG"
CHILD_FD = 3  # the program's channel to the parent, after the child rearranges its fds

_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4

ANSWER_MAX = 1000
ERROR_MAX = 500


# ----------------------------------------------------------------------------- answers


def to_answer(value: Any, patch_type: type | None) -> tuple[str | None, str | None]:
    """Program return value -> (answer, error). Exactly one of the two is set."""
    if patch_type is not None and isinstance(value, patch_type):
        return None, "returned an image patch, not an answer"
    if isinstance(value, bool):
        return ("yes" if value else "no"), None
    if isinstance(value, int):
        try:
            return str(value)[:ANSWER_MAX], None
        except ValueError:
            return None, "returned an integer too large to print"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value)), None
        return repr(value), None
    if isinstance(value, str):
        return value[:ANSWER_MAX], None
    if value is None:
        return None, "returned None, not an answer"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(to_answer(v, patch_type)[0] or "" for v in value)[:ANSWER_MAX], None
    return None, f"returned a {type(value).__name__}, not an answer"


# ----------------------------------------------------------------------------- builtins

_SAFE_BUILTIN_NAMES = (
    "abs all any bool chr dict divmod enumerate filter float frozenset int isinstance iter "
    "len list map max min next ord pow range repr reversed round set slice sorted str sum "
    "tuple zip True False None ArithmeticError AssertionError AttributeError Exception "
    "IndexError KeyError LookupError NameError NotImplementedError RuntimeError StopIteration "
    "TypeError ValueError ZeroDivisionError"
).split()


def _safe_math() -> types.SimpleNamespace:
    """The math functions as plain attributes: no module object (and its loader) exposed."""
    return _flatten_module(math)


class _Budget(BaseException):
    """Raised in the program when it exceeds a budget; recorded even if it is swallowed.

    Not an ``Exception``: a program's ``except Exception`` must not turn a spent budget
    into a loop that only the wall-clock timeout ends."""


class _State:
    """Per-child mutable state, reachable only from worker code (closures, never globals)."""

    def __init__(self, max_calls: int, max_stdout: int) -> None:
        self.max_calls = max_calls
        self.max_stdout = max_stdout
        self.calls = 0
        self.out: list[str] = []
        self.out_bytes = 0
        self.budget: str | None = None
        self.blocked: str | None = None
        self.armed = False


def _make_print(state: _State) -> Callable[..., None]:
    def print_(*args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        text = str(sep).join(str(a) for a in args) + str(end)
        room = state.max_stdout - state.out_bytes
        if len(text) > room:
            state.out.append(text[: max(room, 0)])
            state.out_bytes = state.max_stdout
            state.budget = state.budget or f"stdout limit of {state.max_stdout} bytes exceeded"
            raise _Budget(state.budget)
        state.out.append(text)
        state.out_bytes += len(text)

    return print_


def build_builtins(state: _State) -> dict[str, Any]:
    import builtins as b

    safe = {k: getattr(b, k) for k in _SAFE_BUILTIN_NAMES}
    safe["print"] = _make_print(state)
    return safe


def _make_caller(fd: int, state: _State) -> Callable[..., Any]:
    """The ToolCaller the tool API's patches use: plain data over the channel.

    ``image`` is the index of the question's image (two-image questions); the parent maps
    it to a file, so a program can name an image only by its place, never by a path.
    """

    def call(op: str, box: Any, args: dict[str, Any], image: int = 0) -> Any:
        state.calls += 1
        if state.calls > state.max_calls:
            state.budget = state.budget or f"tool call budget of {state.max_calls} exceeded"
            raise _Budget(state.budget)
        msg: dict[str, Any] = {"t": "call", "op": op, "box": box, "args": args}
        if image:
            msg["img"] = image
        try:
            frame = wire.encode(msg)
        except wire.WireError:
            raise ValueError(f"arguments of tool {op!r} are too large") from None
        except (TypeError, ValueError, RecursionError):
            raise TypeError(f"arguments of tool {op!r} must be plain values") from None
        wire.write_all(fd, frame)
        reply = wire.recv(fd)
        if not reply.get("ok"):
            raise RuntimeError(f"tool {op} failed: {reply.get('error')}")
        return reply.get("result")

    return call


# ----------------------------------------------------------------------------- audit hook


def _make_hook(state: _State) -> Callable[[str, tuple], None]:
    def hook(event: str, args: tuple) -> None:
        if state.armed:
            state.blocked = state.blocked or event
            raise RuntimeError(f"sandbox: {event} is not allowed")

    return hook


# ----------------------------------------------------------------------------- lockdown


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _setrlimit(which: int, value: int) -> None:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(which, (value, hard))


def lock_down(cfg: dict[str, Any], libc: Any, devnull: int) -> None:
    """Apply every process-level layer to the current (child) process. Order matters."""
    os.setsid()  # own process group: the parent kills the whole group on timeout
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.closerange(CHILD_FD + 1, 1 << 16)
    os.umask(0o777)
    root = cfg.get("root")
    if root and os.geteuid() == 0:
        os.chroot(root)  # an empty, read-only directory: no host files are reachable
    os.chdir("/" if root and os.geteuid() == 0 else (root or "/"))
    limits = cfg["limits"]
    _setrlimit(resource.RLIMIT_CORE, 0)
    _setrlimit(resource.RLIMIT_FSIZE, 0)  # no file may grow: writes die with SIGXFSZ
    _setrlimit(resource.RLIMIT_CPU, int(limits["cpu_s"]))
    _setrlimit(resource.RLIMIT_AS, int(limits["as_bytes"]))
    _setrlimit(resource.RLIMIT_NOFILE, CHILD_FD + 1)  # fds 0-3 are taken: no new files
    _setrlimit(resource.RLIMIT_MEMLOCK, 0)
    if os.geteuid() == 0 and cfg.get("uid") is not None:
        os.setgroups([])
        os.setgid(int(cfg["gid"]))
        os.setuid(int(cfg["uid"]))
    _setrlimit(resource.RLIMIT_NPROC, 0)  # effective once not root: fork fails
    if libc is not None:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        # Set after setuid (a uid change clears it): die with the zygote.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(70)  # the zygote is already gone
    sys.setrecursionlimit(int(limits["recursion"]))


# ----------------------------------------------------------------------------- the child


def _program_line(tb: Any) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<program>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(e: BaseException, state: _State) -> str:
    try:
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception:
        msg = type(e).__name__
    state.armed = False  # our own traceback walk touches frames; the program is finished
    line = _program_line(e.__traceback__)
    msg = " ".join(msg.split())[:ERROR_MAX]
    return f"{msg} (line {line})" if line else msg


def _run_job(job: dict[str, Any], ns_factory: Callable, cfg: dict[str, Any]) -> dict[str, Any]:
    limits = cfg["limits"]
    state = _State(int(limits["max_calls"]), int(limits["max_stdout"]))
    caller = _make_caller(CHILD_FD, state)
    program = job.get("program")
    syntax = job.get("syntax", "viper")
    n_images = int(job.get("images", 1))
    try:
        api = ns_factory(caller)
        patch_type = api.get("ImagePatch") if isinstance(api.get("ImagePatch"), type) else None
        if syntax == "visprog":
            if not callable(api.get("_run_visprog")):
                return {"status": "error", "error": "this tool API cannot run VisProg programs"}
            run = api["_run_visprog"]
            entry_args: tuple = (program,) if n_images == 1 else (program, n_images)
        else:
            res = check_program(program)  # again, in the sandbox: defense in depth
            if not res.ok:
                return {"status": "violation", "error": res.reason}
            code = compile(res.tree, "<program>", "exec", dont_inherit=True)
            g: dict[str, Any] = {
                k: _flatten_module(v) for k, v in api.items() if not k.startswith("_")
            }
            g["__builtins__"] = build_builtins(state)
            g["__name__"] = "program"
            g["math"] = g.get("math") or _safe_math()
            exec(code, g)  # noqa: S102 - only defs and constants at top level (static check)
            run = g[ENTRY]
            entry_args = _entry_args(api, n_images)
    except Exception as e:  # the tool API failed to set up: not the program's fault
        return {"status": "crash", "error": f"sandbox setup failed: {_describe(e, state)}"}

    sys.addaudithook(_make_hook(state))
    out: dict[str, Any]
    state.armed = True
    try:
        value = run(*entry_args)
        state.armed = False
        answer, err = to_answer(value, patch_type)
        out = {"status": "ok", "answer": answer} if err is None else {"status": "error"}
        if err is not None:
            out["error"] = err
    except MemoryError:
        state.armed = False
        out = {"status": "oom", "error": "MemoryError: the program ran out of memory"}
    except BaseException as e:  # noqa: BLE001 - any program failure is a result
        state.armed = False
        out = {"status": "error", "error": _describe(e, state)}
    state.armed = False
    if state.blocked:
        out = {"status": "violation", "error": f"blocked at run time: {state.blocked}"}
    elif state.budget:
        out = {"status": "error", "error": state.budget}
    out["stdout"] = "".join(state.out)
    return out


def _flatten_module(v: Any) -> Any:
    """A module in the API becomes its public non-module attributes: no walking from
    ``np`` to ``np.ctypeslib.ctypes`` or a module's loader."""
    if not isinstance(v, types.ModuleType):
        return v
    return types.SimpleNamespace(
        **{
            k: a
            for k, a in vars(v).items()
            if not k.startswith("_") and not isinstance(a, types.ModuleType)
        }
    )


def _root_patch(api: dict[str, Any]) -> Any:
    """The whole-image patch passed to execute_command(image)."""
    make = api.get("_root_patch")
    if callable(make):
        return make()
    return api["ImagePatch"]()


def _entry_args(api: dict[str, Any], n_images: int) -> tuple[Any, ...]:
    """execute_command's arguments: the image patch, or one per image (NLVR2: left, right)."""
    if n_images == 1:
        return (_root_patch(api),)
    make = api.get("_image_patches")
    if not callable(make):
        raise RuntimeError("this tool API takes one image per question")
    return tuple(make(n_images))


def child_main(fd: int, cfg: dict[str, Any], ns_factory: Callable, libc: Any, devnull: int) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        if fd != CHILD_FD:
            os.dup2(fd, CHILD_FD)
            os.close(fd)
        os.set_inheritable(CHILD_FD, False)
        lock_down(cfg, libc, devnull)
        oom_frame = wire.encode({"t": "done", "status": "oom", "error": "out of memory"})
        try:
            job = wire.recv(CHILD_FD)
            result = _run_job(job, ns_factory, cfg)
            result["t"] = "done"
            try:
                frame = wire.encode(result)
            except wire.WireError:
                frame = wire.encode({"t": "done", "status": "error", "error": "result too large"})
            wire.write_all(CHILD_FD, frame)
        except MemoryError:
            wire.write_all(CHILD_FD, oom_frame)
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote loop
        code = 71
    os._exit(code)


# ----------------------------------------------------------------------------- the zygote


def _load_factory(spec: str) -> Callable:
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn or "build_namespace")


def _baseline_vm() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def zygote_main() -> None:
    """Entry point of the zygote process (see module docstring)."""
    cfg = json.loads(os.environ.pop(CONFIG_ENV))
    ctrl = socket.socket(fileno=int(cfg["ctrl_fd"]))
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    layers: dict[str, Any] = {}
    if cfg.get("netns", True) and libc is not None:
        layers["netns"] = libc.unshare(_CLONE_NEWNET) == 0
    else:
        layers["netns"] = False
    factory = _load_factory(cfg["namespace"])
    # Warm the API once so children inherit it imported (cheap forks, no imports later).
    factory(lambda op, box, args: None)
    check_program(f"def {ENTRY}(image):\n    return 1\n")
    ast.parse("0")
    devnull = os.open(os.devnull, os.O_RDWR)
    limits = cfg["limits"]
    limits["as_bytes"] = _baseline_vm() + int(limits["memory_mb"]) * 1024 * 1024
    layers["chroot"] = bool(cfg.get("root")) and os.geteuid() == 0
    layers["setuid"] = os.geteuid() == 0 and cfg.get("uid") is not None
    layers["rlimits"] = True
    layers["audit_hook"] = True
    signal.signal(signal.SIGCHLD, lambda *_: None)
    rd, wr = os.pipe()
    os.set_blocking(wr, False)
    signal.set_wakeup_fd(wr)
    ctrl.sendall(json.dumps({"t": "up", "pid": os.getpid(), "layers": layers}).encode())
    live: set[int] = set()
    while True:
        try:
            ready, _, _ = select.select([ctrl, rd], [], [])
        except InterruptedError:
            ready = [rd]
        if rd in ready:
            try:
                os.read(rd, 4096)
            except BlockingIOError:
                pass
        _reap(ctrl, live)
        if ctrl not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctrl, 65536, 4)
        except OSError:
            break
        if not data:
            break
        msg = json.loads(data.decode())
        if msg["t"] == "fork":
            if not fds:
                continue
            pid = os.fork()
            if pid == 0:
                ctrl.close()
                os.close(rd)
                os.close(wr)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                child_main(fds[0], cfg, factory, libc, devnull)
            for fd in fds:
                os.close(fd)
            live.add(pid)
            ctrl.sendall(json.dumps({"t": "forked", "job": msg["job"], "pid": pid}).encode())
        elif msg["t"] == "kill":
            pid = int(msg["pid"])
            if pid in live:  # never signal a pid we already reaped (it may be reused)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif msg["t"] == "quit":
            break
    for pid in live:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(0)


def _reap(ctrl: socket.socket, live: set[int]) -> None:
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            return
        if pid == 0:
            return
        live.discard(pid)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        try:
            ctrl.sendall(
                json.dumps({"t": "exit", "pid": pid, "signal": sig, "code": code}).encode()
            )
        except OSError:
            return
