"""The wire contract between a sandboxed program and the tool server.

A program runs in a worker process and holds only *client-side* patches: plain
boxes in the original image's pixel coordinates (ViperGPT convention: ``left``,
``lower``, ``right``, ``upper`` with y measured from the image bottom, so
``lower < upper``). Every tool operation is sent to the parent as a
``ToolRequest`` of plain data and answered with a ``ToolResponse`` of plain
JSON-able data, so nothing of the parent (models, files, objects) is reachable
from the program.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Box = tuple[int, int, int, int]  # (left, lower, right, upper), pixels, y from bottom


@dataclass(frozen=True)
class ToolRequest:
    op: str  # e.g. "find", "exists", "verify_property", "simple_query", "size", ...
    image: str  # absolute image path; chosen by the executor, never by the program
    box: Box | None  # patch the op applies to; None = whole image
    args: dict[str, Any] = field(default_factory=dict)  # JSON-able

    def cache_key(self) -> tuple[str, str, Box | None, str]:
        import json

        return (self.image, self.op, self.box, json.dumps(self.args, sort_keys=True))


@dataclass
class ToolResponse:
    ok: bool
    result: Any = None  # JSON-able: bool, int, float, str, list of boxes, ...
    error: str | None = None


class ToolCaller(Protocol):
    """What client-side ImagePatch objects call: one op on one patch of the bound image.

    ``image`` is the index of the question's image the patch belongs to (two-image
    questions); it is passed only when not 0, so a one-image caller may omit it.
    """

    def __call__(self, op: str, box: Box | None, args: dict[str, Any], image: int = 0) -> Any: ...
