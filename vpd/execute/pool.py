"""Parent side of the sandbox: a zygote, one forked child per program, and an event loop.

:class:`SandboxPool` starts the zygote (:mod:`vpd.execute.worker`) as a fresh
interpreter with a scrubbed environment, asks it to fork a child for each program and
talks to that child directly over its own socket pair. The loop multiplexes every
running child: it answers their tool calls in batches through the tool server (loaded
once, here in the parent), records the trace, enforces the wall-clock timeout by having
the zygote kill the child's process group, and turns each child's fate into a status.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vpd.errors import ToolsUnavailable, VpdError
from vpd.execute import wire
from vpd.execute.static import MAX_SOURCE_BYTES, check_program
from vpd.execute.worker import ANSWER_MAX, CONFIG_ENV, ERROR_MAX
from vpd.records import STATUSES, Status, ToolCall
from vpd.tools.protocol import ToolRequest, ToolResponse

DEFAULT_NAMESPACE = "vpd.tools.namespace:build_namespace"
_MAX_COORD = 1 << 31  # pixel coordinates beyond this are no image's


class _ZygoteGone(Exception):
    """The zygote's control socket is closed."""


class ToolHandler(Protocol):
    """What the pool needs from the tool server (vpd.tools.server.ToolServer fits)."""

    def call_batch(self, reqs: list[ToolRequest]) -> list[ToolResponse]: ...

    def summarize(self, req: ToolRequest, result: Any) -> ToolCall: ...


@dataclass(frozen=True)
class Limits:
    """Per-program limits (see vpd.execute docstring for what each layer stops)."""

    timeout_s: float = 10.0
    memory_mb: int = 512
    max_tool_calls: int = 200
    max_stdout: int = 16 * 1024
    recursion: int = 200
    # Tool time is excluded from timeout_s (the server may be batching for others), so
    # a program's tool calls get their own budget: expensive calls on purpose (huge
    # strings, thousands of options) cannot stall the shared server for long.
    tool_time_s: float = 60.0
    # Per call, checked in the parent before the server sees it: args bigger than this
    # (JSON bytes), or holding a list longer than max_tool_list, are refused as the
    # program's error. They bound the parent's cost and the shared cache's memory.
    max_tool_arg_bytes: int = 64 * 1024
    max_tool_list: int = 256

    def worker_view(self) -> dict[str, Any]:
        return {
            # RLIMIT_CPU backs the wall clock up: a CPU-bound loop dies even if the
            # parent is slow to notice it.
            "cpu_s": max(1, math.ceil(self.timeout_s) + 1),
            "memory_mb": self.memory_mb,
            "max_calls": self.max_tool_calls,
            "max_stdout": self.max_stdout,
            "recursion": self.recursion,
        }


@dataclass
class Job:
    id: str
    program: str
    image: str  # absolute path; chosen by the executor, never by the program
    syntax: str = "viper"
    # Further images of the question (NLVR2's right image), also the executor's: the
    # program names an image only by its index, which the parent maps to these paths.
    more_images: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[str, ...]:
        return (self.image, *self.more_images)


@dataclass
class JobResult:
    id: str
    status: Status
    answer: str | None = None
    error: str | None = None
    trace: list[ToolCall] = field(default_factory=list)
    stdout: str = ""
    wall_ms: float = 0.0


@dataclass
class _Running:
    job: Job
    sock: socket.socket
    start: float
    deadline: float
    reader: wire.FrameReader = field(default_factory=wire.FrameReader)
    pid: int | None = None
    trace: list[ToolCall] = field(default_factory=list)
    tool_s: float = 0.0  # tool server time spent on this program's calls
    result: dict[str, Any] | None = None
    eof_at: float | None = None  # channel closed without a result: waiting for exit status
    killed: str | None = None  # why we killed it (timeout / protocol)
    exit: dict[str, Any] | None = None


class SandboxPool:
    """Run untrusted programs, ``workers`` at a time, each in its own locked-down process.

    >>> with SandboxPool(Limits(timeout_s=5), workers=2) as pool:
    ...     for res in pool.run(jobs, tool_server):
    ...         print(res.id, res.status, res.answer)
    """

    def __init__(
        self,
        limits: Limits | None = None,
        workers: int | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        extra_paths: Iterable[str] = (),
    ) -> None:
        self.limits = limits or Limits()
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.namespace = namespace
        self.extra_paths = list(extra_paths)
        self.layers: dict[str, Any] = {}
        self.stats = {"forks": 0, "zygote_starts": 0}
        self._ctrl: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._root: str | None = None
        self._errlog: Any = None

    # ------------------------------------------------------------------ zygote lifecycle

    def start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._stop_zygote()
        if self._root is None:
            self._root = tempfile.mkdtemp(prefix="vpd-sandbox-root-")
            os.chmod(self._root, 0o555)  # empty and read-only: the children's whole world
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cfg: dict[str, Any] = {
            "ctrl_fd": child.fileno(),
            "namespace": self.namespace,
            "limits": self.limits.worker_view(),
            "root": self._root,
        }
        if os.geteuid() == 0:
            try:
                nobody = pwd.getpwnam("nobody")
                cfg["uid"], cfg["gid"] = nobody.pw_uid, nobody.pw_gid
            except KeyError:
                cfg["uid"], cfg["gid"] = 65534, 65534
        import vpd

        pkg_root = str(Path(vpd.__file__).resolve().parent.parent)
        # A scrubbed environment: no secrets or proxies reach the programs' processes.
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join([pkg_root, *self.extra_paths]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "LANG": "C.UTF-8",
            CONFIG_ENV: json.dumps(cfg),
        }
        self._errlog = tempfile.TemporaryFile()  # zygote stderr, shown if it fails to start
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from vpd.execute.worker import zygote_main; zygote_main()"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._errlog,
            pass_fds=[child.fileno()],
            cwd=self._root,
            close_fds=True,
        )
        child.close()
        self._ctrl = parent
        parent.settimeout(120)
        try:
            data = parent.recv(65536)
        except (TimeoutError, OSError):
            data = b""
        if not data:
            self._proc.kill()
            self._proc.wait()
            self._errlog.seek(0)
            tail = self._errlog.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            raise VpdError(f"sandbox zygote failed to start: {' | '.join(tail) or 'no output'}")
        msg = json.loads(data.decode())
        parent.setblocking(False)
        self.layers = msg.get("layers", {})
        self.stats["zygote_starts"] += 1

    def _stop_zygote(self) -> None:
        if self._ctrl is not None:
            try:
                self._ctrl.setblocking(True)
                self._ctrl.send(b'{"t":"quit"}')
            except OSError:
                pass
            self._ctrl.close()
            self._ctrl = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._errlog is not None:
            self._errlog.close()
            self._errlog = None

    def close(self) -> None:
        self._stop_zygote()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> SandboxPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop

    def run(self, jobs: Iterable[Job], tools: ToolHandler) -> Iterator[JobResult]:
        """Yield one result per job (in completion order); never raises for a bad program."""
        self.start()
        pending = iter(jobs)
        running: dict[int, _Running] = {}  # by socket fd
        by_pid: dict[int, _Running] = {}
        done: deque[JobResult] = deque()
        sel = selectors.DefaultSelector()
        assert self._ctrl is not None
        sel.register(self._ctrl, selectors.EVENT_READ, None)
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < self.workers:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                        break
                    try:
                        r = self._launch(job, sel, done)
                    except _ZygoteGone:
                        self._zygote_died(running, sel, done)
                        r = self._launch(job, sel, done)
                    if r is not None:
                        running[r.sock.fileno()] = r
                while done:
                    yield done.popleft()
                if exhausted and not running:
                    return
                now = time.monotonic()
                wake = min((r.eof_at + 2.0 if r.eof_at else r.deadline) for r in running.values())
                calls: list[tuple[_Running, ToolRequest, str | None, int]] = []
                for key, _ in sel.select(timeout=max(0.0, wake - now)):
                    if key.data is None:
                        if not self._read_ctrl(by_pid, running):
                            self._zygote_died(running, sel, done)
                            break
                        continue
                    r = key.data
                    self._read_child(r, calls, sel)
                if calls:
                    self._serve(calls, tools)
                now = time.monotonic()
                for fd, r in list(running.items()):
                    res = self._settle(r, now)
                    if res is not None:
                        del running[fd]
                        if r.pid is not None:
                            by_pid.pop(r.pid, None)
                        self._release(r, sel)
                        done.append(res)
                for r in running.values():
                    if r.pid is not None:
                        by_pid[r.pid] = r
        finally:
            for r in running.values():
                self._kill(r)
                self._release(r, sel)
            sel.close()

    def _launch(self, job: Job, sel: selectors.BaseSelector, done: deque) -> _Running | None:
        t0 = time.monotonic()
        why = _check_visprog(job.program) if job.syntax == "visprog" else None
        if job.syntax != "visprog":
            res = check_program(job.program)
            why = None if res.ok else res.reason
        if why is not None:
            done.append(JobResult(job.id, "violation", error=why))
            return None
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            assert self._ctrl is not None
            self._ctrl.setblocking(True)
            socket.send_fds(
                self._ctrl, [json.dumps({"t": "fork", "job": job.id}).encode()], [b.fileno()]
            )
            self._ctrl.setblocking(False)
        except OSError:
            a.close()
            b.close()
            raise _ZygoteGone from None
        b.close()
        self.stats["forks"] += 1
        # The job waits in the socket buffer until the child has locked itself down.
        a.setblocking(True)
        msg = {"t": "job", "program": job.program, "syntax": job.syntax}
        if job.more_images:
            msg["images"] = len(job.images)  # how many, never where
        wire.write_all(a.fileno(), wire.encode(msg))
        a.setblocking(False)
        r = _Running(job=job, sock=a, start=t0, deadline=t0 + self.limits.timeout_s)
        sel.register(a, selectors.EVENT_READ, r)
        return r

    def _read_ctrl(self, by_pid: dict[int, _Running], running: dict[int, _Running]) -> bool:
        assert self._ctrl is not None
        while True:
            try:
                data = self._ctrl.recv(65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            msg = json.loads(data.decode())
            if msg.get("t") == "forked":
                for r in running.values():
                    if r.job.id == msg["job"] and r.pid is None:
                        r.pid = int(msg["pid"])
                        by_pid[r.pid] = r
                        if r.killed:  # timed out before we learnt its pid
                            self._kill(r)
                        break
            elif msg.get("t") == "exit":
                r = by_pid.get(int(msg["pid"]))
                if r is not None:
                    r.exit = msg

    def _read_child(
        self,
        r: _Running,
        calls: list[tuple[_Running, ToolRequest, str | None, int]],
        sel: selectors.BaseSelector,
    ) -> None:
        try:
            data = r.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if r.eof_at is None:
                r.eof_at = time.monotonic()
            sel.unregister(r.sock)
            return
        try:
            msgs = r.reader.feed(data)
        except wire.WireError as e:
            self._protocol_error(r, str(e), sel)
            return
        for msg in msgs:
            t = msg.get("t")
            if t == "call" and r.result is None:
                op, box, args = msg.get("op"), msg.get("box"), msg.get("args")
                # The client API only sends boxes the server gave it: anything else (NaN,
                # inf, absurd magnitudes) means the child was not running the API.
                ok_box = box is None or (
                    isinstance(box, list)
                    and len(box) == 4
                    and all(
                        isinstance(v, (int, float))
                        and not isinstance(v, bool)
                        and math.isfinite(v)
                        and abs(v) < _MAX_COORD
                        for v in box
                    )
                )
                img = msg.get("img", 0)
                ok_img = (
                    isinstance(img, int)
                    and not isinstance(img, bool)
                    and 0 <= img < len(r.job.images)
                )
                if not isinstance(op, str) or not isinstance(args, dict) or not ok_box:
                    self._protocol_error(r, "malformed tool call", sel)
                    return
                if not ok_img:  # the client API only sends indexes of the job's images
                    self._protocol_error(r, "tool call for an image the question lacks", sel)
                    return
                if len(r.trace) + sum(1 for c in calls if c[0] is r) >= self.limits.max_tool_calls:
                    # The child enforces the budget too; a child that does not is compromised.
                    self._protocol_error(r, "tool calls beyond the budget", sel)
                    return
                box_t = tuple(int(v) for v in box) if box is not None else None
                req = ToolRequest(op=op, image=r.job.images[img], box=box_t, args=args)
                calls.append((r, req, self._refuse(args), img))
            elif t == "done" and r.result is None:
                r.result = msg
            else:
                self._protocol_error(r, f"unexpected message {t!r}", sel)
                return

    def _protocol_error(self, r: _Running, why: str, sel: selectors.BaseSelector) -> None:
        r.killed = r.killed or f"protocol error: {why}"
        self._kill(r)
        if r.eof_at is None:
            r.eof_at = time.monotonic()
            try:
                sel.unregister(r.sock)
            except (KeyError, ValueError):
                pass

    def _refuse(self, args: dict[str, Any]) -> str | None:
        """Why the parent refuses a call's args before the server sees them (None: fine)."""
        try:
            size = len(json.dumps(args, ensure_ascii=False, separators=(",", ":")))
        except (TypeError, ValueError, RecursionError):
            return "tool arguments must be plain JSON values"
        if size > self.limits.max_tool_arg_bytes:
            return f"tool arguments of {size} bytes exceed {self.limits.max_tool_arg_bytes}"
        for k, v in args.items():
            if isinstance(v, list) and len(v) > self.limits.max_tool_list:
                n = self.limits.max_tool_list
                return f"tool argument {k!r} has {len(v)} items, more than {n}"
        return None

    def _serve(
        self, calls: list[tuple[_Running, ToolRequest, str | None, int]], tools: ToolHandler
    ) -> None:
        t0 = time.perf_counter()
        reqs = [req for _, req, why, _ in calls if why is None]
        try:
            resps = iter(tools.call_batch(reqs) if reqs else [])
        except ToolsUnavailable:
            raise  # no tool can answer: stop; the programs in flight stay undone
        except Exception as e:  # a tool server bug must not stop the run
            resps = iter([ToolResponse(ok=False, error=f"tool server error: {e}") for _ in reqs])
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(reqs))
        for r, req, why, img in calls:
            if why is not None:
                resp = ToolResponse(ok=False, error=why)
                # Refused args may be huge: keep only the patch in the trace.
                tc = ToolCall(name=req.op, args={}, result="")
                call_ms = 0.0
            else:
                resp = next(resps, None) or ToolResponse(ok=False, error="no answer")
                call_ms = ms
                # Tool time is the server's, not the program's: it does not count to the
                # timeout, but to the program's own tool-time budget.
                r.deadline += ms / 1000
                r.tool_s += ms / 1000
                try:
                    tc = tools.summarize(req, resp.result if resp.ok else None)
                except Exception:
                    tc = ToolCall(name=req.op, args={}, result=str(resp.result)[:200])
            if not resp.ok:
                tc.result = f"error: {str(resp.error)[:ERROR_MAX]}"
            if r.job.more_images:
                tc.image = img  # which of the question's images (0 = left)
            tc.ms = round(call_ms, 3)
            r.trace.append(tc)
            if r.tool_s > self.limits.tool_time_s and not r.killed:
                r.killed = "tool time"
                self._kill(r)
                continue
            reply = {"t": "result", "ok": resp.ok, "result": resp.result, "error": resp.error}
            try:
                frame = wire.encode(reply)
            except (TypeError, ValueError, wire.WireError):
                frame = wire.encode({"t": "result", "ok": False, "error": "unencodable result"})
            try:
                r.sock.setblocking(True)
                r.sock.settimeout(5)
                r.sock.sendall(frame)
            except OSError:
                pass  # the child died; its EOF settles it
            finally:
                r.sock.setblocking(False)

    def _settle(self, r: _Running, now: float) -> JobResult | None:
        wall = (now - r.start) * 1000
        base = JobResult(r.job.id, "crash", trace=r.trace, wall_ms=round(wall, 3))
        if r.result is not None:
            m = r.result
            status = m.get("status")
            if status not in STATUSES:
                status, m = "crash", {"error": f"worker reported bad status {status!r}"}
            base.status = status
            answer, error = m.get("answer"), m.get("error")
            base.answer = answer[:ANSWER_MAX] if isinstance(answer, str) else None
            base.error = error[: ERROR_MAX + 100] if isinstance(error, str) else None
            out = m.get("stdout")
            base.stdout = out[: self.limits.max_stdout] if isinstance(out, str) else ""
            return base
        if r.killed in ("timeout", "tool time"):
            if r.eof_at is not None or now > r.deadline + 2.0:
                base.status = "timeout"
                base.error = (
                    f"timed out after {self.limits.timeout_s:g} s"
                    if r.killed == "timeout"
                    else f"tool calls took over {self.limits.tool_time_s:g} s"
                )
                return base
            return None
        if r.killed:
            if r.eof_at is not None:
                base.error = r.killed
                return base
            return None
        if r.eof_at is not None:
            if r.exit is None and now < r.eof_at + 2.0:
                return None  # wait for the zygote to report how it died
            base.status, base.error = _classify_death(r.exit)
            return base
        if now >= r.deadline:
            r.killed = "timeout"
            self._kill(r)
        return None

    def _kill(self, r: _Running) -> None:
        if r.pid is None or self._ctrl is None:
            return
        try:
            self._ctrl.setblocking(True)
            self._ctrl.send(json.dumps({"t": "kill", "pid": r.pid}).encode())
            self._ctrl.setblocking(False)
        except OSError:
            pass

    def _release(self, r: _Running, sel: selectors.BaseSelector) -> None:
        try:
            sel.unregister(r.sock)
        except (KeyError, ValueError):
            pass
        r.sock.close()

    def _zygote_died(
        self, running: dict[int, _Running], sel: selectors.BaseSelector, done: deque
    ) -> None:
        """Children die with the zygote (PDEATHSIG): fail them and start a new zygote."""
        for r in running.values():
            self._release(r, sel)
            done.append(JobResult(r.job.id, "crash", error="sandbox zygote died", trace=r.trace))
        running.clear()
        sel.unregister(self._ctrl)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._stop_zygote()
        self.start()
        sel.register(self._ctrl, selectors.EVENT_READ, None)


def _check_visprog(text: str) -> str | None:
    """A malformed VisProg program is refused before a worker starts, like a ViperGPT one
    failing the static check (its own parser checks it again in the worker)."""
    if len(text.encode("utf-8", "replace")) > MAX_SOURCE_BYTES:
        return f"program larger than {MAX_SOURCE_BYTES} bytes"
    try:
        from vpd.tools.visprog import check_visprog
    except ImportError:  # a custom tool API without VisProg: its worker side decides
        return None
    reason = check_visprog(text)
    return f"VisProg: {reason}" if reason else None


def _classify_death(exit: dict[str, Any] | None) -> tuple[Status, str]:
    if exit is None:
        return "crash", "worker died without a result"
    sig = int(exit.get("signal") or 0)
    if sig == signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if sig == signal.SIGXFSZ:
        return "violation", "tried to write a file"
    if sig:
        try:
            name: object = signal.Signals(sig).name
        except ValueError:
            name = sig
        return "crash", f"worker killed by signal {name}"
    return "crash", f"worker exited with code {exit.get('code')} without a result"
