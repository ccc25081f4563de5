"""The namespace a program runs in: the ImagePatch API, helpers, and the executor's hooks.

Both program syntaxes meet here: ViperGPT code calls ``vpd.tools.api`` directly, VisProg
step programs run through ``vpd.tools.visprog`` on the same patches. The sandbox worker
imports the factory by name (``vpd.tools.namespace:build_namespace``) before the program
runs, so every import happens before the audit hook forbids them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from vpd.tools.api import (
    ImagePatch,
    answer_text,
    best_image_match,
    bool_to_yesno,
    coerce_to_numeric,
    distance,
    make_image_handle,
)
from vpd.tools.protocol import ToolCaller, ToolRequest
from vpd.tools.visprog import run_visprog


def build_namespace(caller: ToolCaller) -> dict[str, Any]:
    """The names a program may use, bound to ``caller`` (plus private executor hooks)."""

    def llm_query(question: str, long_answer: bool = True) -> str:
        """Answers a text question using a large language model (no image)."""
        args = {"question": str(question), "long_answer": bool(long_answer)}
        return str(caller("llm_query", None, args))

    def root() -> ImagePatch:
        return make_image_handle(caller)

    def run_visprog_program(text: str) -> Any:
        return run_visprog(text, root)

    return {
        "ImagePatch": ImagePatch,
        "best_image_match": best_image_match,
        "distance": distance,
        "bool_to_yesno": bool_to_yesno,
        "coerce_to_numeric": coerce_to_numeric,
        "llm_query": llm_query,
        "math": math,
        "_root_patch": root,
        "_run_visprog": run_visprog_program,
    }


def run_inprocess(
    program: str, image_path: str | Path, server: Any, syntax: str = "viper"
) -> tuple[str | None, list[Any]]:
    """Run a TRUSTED program in this process against ``server`` (a ToolServer).

    The plain baseline for tests and benchmarks: no sandbox, same namespace, same tool
    calls and trace entries (``vpd.records.ToolCall``) as the executor. Program errors
    propagate. Returns ``(answer, trace)``.
    """
    image = str(Path(image_path).resolve())
    trace: list[Any] = []

    def caller(op: str, box: Any, args: dict[str, Any]) -> Any:
        req = ToolRequest(op, image, tuple(int(v) for v in box) if box is not None else None, args)
        t0 = time.perf_counter()
        resp = server.call(req)
        tc = server.summarize(req, resp.result if resp.ok else None)
        if not resp.ok:
            tc.result = f"error: {resp.error}"
        tc.ms = round((time.perf_counter() - t0) * 1000, 3)
        trace.append(tc)
        if not resp.ok:
            raise RuntimeError(f"tool {op} failed: {resp.error}")
        return resp.result

    ns = build_namespace(caller)
    if syntax == "visprog":
        value = ns["_run_visprog"](program)
    else:
        g = {k: v for k, v in ns.items() if not k.startswith("_")}
        g["__name__"] = "program"
        exec(compile(program, "<program>", "exec"), g)  # noqa: S102 - trusted code only
        value = g["execute_command"](ns["_root_patch"]())
    return answer_text(value), trace
