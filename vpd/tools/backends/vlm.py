"""The ``vlm`` tool mode: the ops that ask a VLM, answered by any VLM folder.

``simple_query``, ``verify_property`` and ``best_text_match`` (and VisProg's ``VQA`` step,
which is a ``simple_query``) are basic perception questions about a patch. In the ``vlm``
mode a backend hands them to one image-text-to-text model (``--tool-opt vqa=PATH``: any
VLM folder, a ``vpd tune`` output, a hub id; ``vqa=tiny`` is the embedded tiny VLM), for
the ``synthetic`` backend (whose other ops stay classical CV) and the ``hf`` backend alike.
This module is the one place that asks: both backends build a :class:`VlmTools`, and
``vpd sdvp`` uses the same questions and views for its sub-tasks, so a student VLM is
trained on exactly what the tool will ask it.

- every op becomes one question (:func:`question_for`): ``simple_query(q)`` -> ``q``;
  ``verify_property(name, prop)`` -> "Is the <name> <prop>?"; ``best_text_match(options)``
  -> "Is it <a>, <b> or <c>?";
- the model sees the patch (:func:`view_image`): ``crop`` (default: the patch alone, as
  ViperGPT's tools do) or ``pointer`` (the whole image with the patch drawn as a box);
- it answers with VPD's answer prompt (the question + ``ANSWER_SUFFIX`` in its own chat
  template, as ``vpd eval`` asks it and ``vpd rationalize`` trains it), greedy;
- the reply becomes the op's result (:func:`result_from`): the short answer, a yes/no
  boolean, or the option the reply names.

The model is loaded once, on first use, in the process that owns the backend (the tool
server in the parent, never a sandboxed worker); requests are answered in batches of
``batch_size`` with left padding (batched answers equal one-at-a-time answers); the tool
server caches results like every op's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from PIL import Image, ImageDraw

from vpd.errors import ToolsUnavailable, VpdError
from vpd.hardware import resolve_dtype
from vpd.metrics import normalize_answer, to_yesno
from vpd.tools.backends.base import ImageData, ToolError
from vpd.tools.protocol import Box
from vpd.vlm import (
    ANSWER_SUFFIX,
    Generator,
    clean_answer,
    load_model,
    resolve_device,
    resolve_model,
)

VLM_OPS = ("simple_query", "verify_property", "best_text_match")
VIEWS = ("crop", "pointer")
POINTER_COLOR = (255, 0, 0)
MAX_QUESTION = 300  # characters of a question sent to the model


# ----------------------------------------------------------------------------- questions


def join_options(options: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b or c"``."""
    if len(options) == 1:
        return options[0]
    return ", ".join(options[:-1]) + " or " + options[-1]


def question_for(op: str, args: dict[str, Any]) -> str:
    """The question the VLM is asked for one call of a VLM op (``args`` as the server got them)."""
    if op == "simple_query":
        q = _text(args.get("question"), "question")
        return q[:MAX_QUESTION]
    if op == "verify_property":
        name, prop = _text(args.get("name"), "name"), _text(args.get("prop"), "property")
        return f"Is the {name} {prop}?"[:MAX_QUESTION]
    if op == "best_text_match":
        return f"Is it {join_options(options_of(args))}?"[:MAX_QUESTION]
    raise ToolError(f"{op} is not a VLM op (VLM ops: {', '.join(VLM_OPS)})")


def options_of(args: dict[str, Any]) -> list[str]:
    opts = args.get("options")
    if isinstance(opts, str):
        opts = [opts]
    if not isinstance(opts, list) or not opts or not all(isinstance(o, str) for o in opts):
        raise ToolError("best_text_match needs a non-empty list of strings")
    return [o.strip()[:200] for o in opts]


def yes_no(reply: str) -> str | None:
    """``"yes"``/``"no"`` from a reply ("Yes, it is." counts), else None."""
    ans = to_yesno(reply)
    if ans is None:
        words = normalize_answer(reply).split()
        ans = to_yesno(words[0]) if words else None
    return ans


def match_option(reply: str, options: list[str]) -> str | None:
    """The option a reply names: equal after VQA normalization, else the longest option the
    reply contains as whole words; None when it names none."""
    said = normalize_answer(reply)
    norm = [normalize_answer(o) for o in options]
    for o, n in zip(options, norm, strict=True):
        if n and n == said:
            return o
    padded = f" {said} "
    hits = [(len(n), i) for i, n in enumerate(norm) if n and f" {n} " in padded]
    if hits:
        return options[max(hits, key=lambda h: (h[0], -h[1]))[1]]
    return None


def result_from(op: str, args: dict[str, Any], reply: str) -> Any:
    """The op's result from the model's reply: an answer, a boolean, or one of the options.

    A reply that is not a yes/no (``verify_property``) counts as no; one that names no
    option (``best_text_match``) picks the first option, as a classifier must pick one.
    """
    if op == "simple_query":
        return clean_answer(reply).lower()
    if op == "verify_property":
        return yes_no(reply) == "yes"
    if op == "best_text_match":
        opts = options_of(args)
        return match_option(reply, opts) or opts[0]
    raise ToolError(f"{op} is not a VLM op")


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ToolError(f"{what} must be a non-empty string")
    return " ".join(v.split())


# ----------------------------------------------------------------------------- views


def pil_box(box: Box, height: int) -> tuple[int, int, int, int]:
    """A ViperGPT box (y up from the bottom) as PIL's (left, top, right, bottom)."""
    left, lower, right, upper = box
    return left, height - upper, right, height - lower


def pointer_width(width: int, height: int) -> int:
    """Line width of the drawn box: visible at any resolution, thin next to the objects."""
    return max(2, round(min(width, height) / 100))


def view_image(
    pil: Image.Image,
    box: Box | None,
    view: str = "crop",
    color: tuple[int, int, int] = POINTER_COLOR,
) -> Image.Image:
    """What the model sees of a patch (``box`` in ViperGPT pixels, ``None`` = the whole image).

    ``crop``: the patch alone. ``pointer``: the whole image with a ``color`` box drawn just
    OUTSIDE the patch, so every pixel of the patch itself is unchanged (the box frames the
    object; it never paints over it). A patch that is the whole image gets no box.
    """
    w, h = pil.size
    left, lower, right, upper = _clip(box, w, h)
    if right - left < 1 or upper - lower < 1:
        raise ToolError("the image patch is empty")
    if view == "crop":
        return pil.crop(pil_box((left, lower, right, upper), h))
    if view != "pointer":
        raise ToolError(f"unknown view {view!r} (choose {', '.join(VIEWS)})")
    out = pil.convert("RGB")  # a copy: the caller's image stays clean
    if (left, lower, right, upper) == (0, 0, w, h):
        return out
    lw = pointer_width(w, h)
    x0, y0, x1, y1 = pil_box((left, lower, right, upper), h)
    draw = ImageDraw.Draw(out)
    for k in range(1, lw + 1):  # rings 1..lw pixels outside the patch
        draw.rectangle((x0 - k, y0 - k, x1 - 1 + k, y1 - 1 + k), outline=color)
    return out


def _clip(box: Box | None, w: int, h: int) -> Box:
    if box is None:
        return (0, 0, w, h)
    left, lower, right, upper = (int(v) for v in box)
    left, right = min(max(left, 0), w), min(max(right, 0), w)
    lower, upper = min(max(lower, 0), h), min(max(upper, 0), h)
    return (left, lower, max(left, right), max(lower, upper))


# ----------------------------------------------------------------------------- the model


class VlmTools:
    """One VLM answering the VLM ops (see the module docstring); loaded on first use."""

    def __init__(
        self,
        model: str,
        *,
        ops: Iterable[str] = VLM_OPS,
        view: str = "crop",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 10,
        trust_remote_code: bool = False,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ToolError("vqa must name a VLM folder or hub id")
        ops = _op_list(ops)
        if view not in VIEWS:
            raise ToolError(f"vqa_view must be one of {', '.join(VIEWS)}, got {view!r}")
        if batch_size < 1 or max_new_tokens < 1:
            raise ToolError("batch_size and max_new_tokens must be at least 1")
        self.model = model
        self.ops = frozenset(ops)
        self.view = view
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.trust_remote_code = trust_remote_code
        self._gen: Generator | None = None
        self.calls = 0  # model calls (batches), for tests and stats

    # ------------------------------------------------------------------ loading
    def generator(self) -> Generator:
        if self._gen is None:
            try:
                src = resolve_model(self.model)
                device = resolve_device(self.device)
                model, processor = load_model(
                    src, resolve_dtype(self.dtype, device), device, self.trust_remote_code
                )
                self._gen = Generator(model, processor)
            except VpdError as e:
                # Not the program's fault: stop the stage rather than fail every program.
                raise ToolsUnavailable(f"cannot load the vqa model {self.model!r}: {e}") from None
        return self._gen

    # ------------------------------------------------------------------ asking
    def ask(self, items: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
        """Raw replies to ``(image, patch, question)`` items, in batches; a bad item (an
        empty patch, a question that is not text) gets its exception in its place."""
        out: list[Any] = [None] * len(items)
        ready: list[tuple[int, Image.Image, str]] = []
        for i, (img, box, question) in enumerate(items):
            try:
                ready.append((i, view_image(img.pil, box, self.view), _text(question, "question")))
            except ToolError as e:
                out[i] = e
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start : start + self.batch_size]
            for (i, _, _), reply in zip(chunk, self._generate(chunk), strict=True):
                out[i] = reply
        return out

    def _generate(self, chunk: list[tuple[int, Image.Image, str]]) -> list[Any]:
        gen = self.generator()
        try:
            self.calls += 1
            return gen.generate(
                [im for _, im, _ in chunk],
                [gen.prompt(q, ANSWER_SUFFIX) for _, _, q in chunk],
                self.max_new_tokens,
            )
        except ToolsUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - one item may break a batch: retry each alone
            if len(chunk) == 1:
                return [ToolError(f"the VLM failed: {type(e).__name__}: {e}")]
            return [r for item in chunk for r in self._generate([item])]

    def run(self, op: str, items: list[tuple[ImageData, Box | None, dict[str, Any]]]) -> list[Any]:
        """Results of one VLM op for ``(image, patch, args)`` items (exceptions in place)."""
        out: list[Any] = [None] * len(items)
        asks: list[tuple[int, tuple[ImageData, Box | None, str]]] = []
        for i, (img, box, args) in enumerate(items):
            try:
                if op == "best_text_match" and len(options_of(args)) == 1:
                    out[i] = options_of(args)[0]  # nothing to choose between
                    continue
                asks.append((i, (img, box, question_for(op, args))))
            except ToolError as e:
                out[i] = e
        replies = self.ask([a for _, a in asks])
        for (i, _), reply in zip(asks, replies, strict=True):
            if isinstance(reply, Exception):
                out[i] = reply
            else:
                out[i] = result_from(op, items[i][2], reply)
        return out

    def close(self) -> None:
        self._gen = None


def _op_list(ops: Iterable[str] | str) -> list[str]:
    if isinstance(ops, str):
        ops = [p.strip() for p in re.split(r"[,\s]+", ops) if p.strip()]
    ops = list(ops)
    bad = [o for o in ops if o not in VLM_OPS]
    if bad or not ops:
        raise ToolError(f"vqa_ops must name some of {', '.join(VLM_OPS)}, got {ops!r}")
    return ops


def make_vlm(
    vqa: str | None,
    *,
    ops: Iterable[str] | str,
    view: str,
    device: str,
    dtype: str,
    batch_size: int,
    max_new_tokens: int,
) -> VlmTools | None:
    """A backend's VLM from its options (``vqa=None``: no VLM mode)."""
    if vqa is None:
        return None
    return VlmTools(
        str(vqa),
        ops=ops,
        view=view,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
