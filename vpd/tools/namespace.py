"""The namespace a program runs in: the ImagePatch API, helpers, and the executor's hooks.

Hooks (underscore names, never given to a program): ``_root_patch()`` the image patch,
``_image_patches(n)`` one patch per image of a multi-image question (NLVR2: left, right),
``_run_visprog(text, n_images)`` a VisProg program on those images.

Both program syntaxes meet here: ViperGPT code calls ``vpd.tools.api`` directly, VisProg
step programs run through ``vpd.tools.visprog`` on the same patches. The sandbox worker
imports the factory by name (``vpd.tools.namespace:build_namespace``) before the program
runs, so every import happens before the audit hook forbids them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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

    def image_patches(n: int) -> list[ImagePatch]:
        """One whole-image patch per image of the question (NLVR2: left, right)."""
        return [make_image_handle(caller, i) for i in range(n)]

    def run_visprog_program(text: str, n_images: int = 1) -> Any:
        return run_visprog(text, image_patches(n_images))

    return {
        "ImagePatch": ImagePatch,
        "best_image_match": best_image_match,
        "distance": distance,
        "bool_to_yesno": bool_to_yesno,
        "coerce_to_numeric": coerce_to_numeric,
        "llm_query": llm_query,
        "math": math,
        "_root_patch": root,
        "_image_patches": image_patches,
        "_run_visprog": run_visprog_program,
    }


def run_inprocess(
    program: str,
    image_path: str | Path | Sequence[str | Path],
    server: Any,
    syntax: str = "viper",
) -> tuple[str | None, list[Any]]:
    """Run a TRUSTED program in this process against ``server`` (a ToolServer).

    The plain baseline for tests and benchmarks: no sandbox, same namespace, same tool
    calls and trace entries (``vpd.records.ToolCall``) as the executor. Program errors
    propagate. ``image_path``: the image, or the question's images in order (NLVR2: left,
    right; the program then gets one patch per image). Returns ``(answer, trace)``.
    """
    paths = [image_path] if isinstance(image_path, str | Path) else list(image_path)
    images = [str(Path(p).resolve()) for p in paths]
    trace: list[Any] = []

    def caller(op: str, box: Any, args: dict[str, Any], image: int = 0) -> Any:
        box_t = tuple(int(v) for v in box) if box is not None else None
        req = ToolRequest(op, images[image], box_t, args)
        t0 = time.perf_counter()
        resp = server.call(req)
        tc = server.summarize(req, resp.result if resp.ok else None)
        if not resp.ok:
            tc.result = f"error: {resp.error}"
        if len(images) > 1:
            tc.image = image  # which image the call looked at (0 = left)
        tc.ms = round((time.perf_counter() - t0) * 1000, 3)
        trace.append(tc)
        if not resp.ok:
            raise RuntimeError(f"tool {op} failed: {resp.error}")
        return resp.result

    ns = build_namespace(caller)
    if syntax == "visprog":
        value = ns["_run_visprog"](program, len(images))
    else:
        g = {k: v for k, v in ns.items() if not k.startswith("_")}
        g["__name__"] = "program"
        exec(compile(program, "<program>", "exec"), g)  # noqa: S102 - trusted code only
        value = g["execute_command"](*ns["_image_patches"](len(images)))
    return answer_text(value), trace
