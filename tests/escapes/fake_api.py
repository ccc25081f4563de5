"""A tiny client-side tool API for sandbox tests (the real one is vpd.tools.api)."""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

# Module-level mutable state in the zygote: a program mutating it must not be seen by
# the next program (each runs in its own forked child).
REGISTRY: list[int] = []


def _leaky_open(path: str, mode: str = "r") -> str:
    """A buggy tool API that hands programs a file opener: the audit hook must stop it."""
    with open(path, mode) as f:
        return f.read() if "r" in mode else str(f.write("x"))


def _leaky_connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return "connected"


def _leaky_fork() -> str:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return "forked"


def _abort() -> None:
    """Simulates an interpreter crash inside the worker."""
    os.abort()


def _garbage() -> None:
    """Simulates a compromised worker writing junk to the parent's channel."""
    os.write(3, b"\xff\xff\xff\x7fjunk")


def _leaky_import(name: str) -> Any:
    return importlib.import_module(name)


def build_namespace(caller: Any) -> dict[str, Any]:
    class ImagePatch:
        def __init__(self, box: list[int] | None = None) -> None:
            self.box = list(box) if box is not None else [0, 0, 100, 100]
            self.left, self.lower, self.right, self.upper = self.box
            self.width = self.right - self.left
            self.height = self.upper - self.lower

        def find(self, name: str) -> list[ImagePatch]:
            return [ImagePatch(b) for b in caller("find", self.box, {"name": name})]

        def exists(self, name: str) -> bool:
            return bool(caller("exists", self.box, {"name": name}))

        def simple_query(self, question: str) -> str:
            return str(caller("simple_query", self.box, {"question": question}))

    def bool_to_yesno(b: bool) -> str:
        return "yes" if b else "no"

    return {
        "ImagePatch": ImagePatch,
        "bool_to_yesno": bool_to_yesno,
        "_root_patch": lambda: ImagePatch(),
        "registry": REGISTRY,
        "leaky_open": _leaky_open,
        "leaky_connect": _leaky_connect,
        "leaky_fork": _leaky_fork,
        "leaky_import": _leaky_import,
        "crash_now": _abort,
        "send_garbage": _garbage,
    }
