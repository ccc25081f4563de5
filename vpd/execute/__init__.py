"""`vpd execute`: run LLM-written programs against the vision tools, in a sandbox.

Threat model
------------
Programs are untrusted text from an LLM (which may itself be prompted by untrusted
questions). We assume a program may try anything Python allows: reach builtins or
modules through dunder/frame walks, read or write host files, open sockets, fork,
exhaust CPU/memory/output, crash its interpreter, tamper with the tool API, or leave
state behind for the next program. The goal: whatever a program does, its only effect
is its own execution record; the host, the parent process (tool server, models,
output files) and other programs are untouched, and the run goes on.

Layers (each stops the attack on its own where it can; together they overlap)
------------------------------------------------------------------------------
1. Static check (:mod:`vpd.execute.static`), in the parent and again in the child:
   an AST *allowlist* of node types; no import/class/async/global/with/yield/match/
   decorators; no ``_``-prefixed names or attributes and no introspection attributes
   (``gi_frame``, ``tb_frame``, ``f_globals``, ``mro``...); banned names (exec, eval,
   getattr, type, vars, open...); ``.format`` only on literals without attribute/item
   fields; no attribute assignment; bounded size, node count, depth, literals and
   constant expressions; definitions run no user code. Failing -> ``violation``.
2. Process isolation (:mod:`vpd.execute.worker`): a zygote (fresh interpreter,
   scrubbed environment, never a fork of a process holding models) forks one child per
   program, so no state survives a program. The zygote enters a new, empty network
   namespace (no interfaces but a down loopback) when permitted.
3. Child lockdown, applied before the program is even read: new session (the parent
   kills the whole group), stdio to /dev/null, every other fd closed, ``chroot`` into an
   empty read-only directory, uid/gid ``nobody`` (when started as root),
   ``PR_SET_NO_NEW_PRIVS``, not dumpable, parent-death signal, rlimits: address space
   (-> ``oom``), CPU seconds (-> ``timeout``), no new fds, file size 0 (no writes), no
   processes (no fork), no core dumps; a recursion limit.
4. Restricted runtime: fresh globals holding only the tool API and a safe builtins
   subset (no ``__import__``, open, getattr...; ``print`` captured with a byte cap;
   ``math`` as plain functions); a tool-call budget; and an audit hook that refuses
   *every* audit event once the program starts (import, open, socket, os.*, subprocess,
   ctypes, frame/code attribute access...) and turns it into ``violation``.
5. The parent treats the child as hostile: JSON frames only (never pickle), size caps,
   schema checks on tool calls; the image path comes from the executor, never the
   program; a wall-clock deadline (tool time excluded) kills the group -> ``timeout``;
   a child that dies without a result -> ``crash``; a dead zygote is replaced.

Statuses: ``ok`` (answer set), ``error`` (exception/budget/bad return type, with a
one-line message and program line), ``timeout``, ``oom``, ``violation``, ``crash``.

Not covered: kernel exploits (add seccomp or a container/VM for hostile *humans*),
side channels, and the tool backends themselves (they run in the parent on data the
program chose: keep them robust to any string and box).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpd.execute.runner import ExecuteConfig, run_execute

__all__ = ["ExecuteConfig", "run_execute"]


def __getattr__(name: str) -> Any:
    # Lazy, so the zygote importing vpd.execute.worker does not pull in the runner.
    if name in __all__:
        from vpd.execute import runner

        return getattr(runner, name)
    raise AttributeError(name)
