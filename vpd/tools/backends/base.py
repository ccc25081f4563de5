"""The vision-tool backend interface the ToolServer drives.

A backend answers tool ops on a region of a decoded image. Every method takes an
:class:`ImageData` (decoded once per image by the server and shared by all programs that
ask about it) and a ``box`` in ViperGPT pixel coordinates (``left, lower, right, upper``,
y from the image bottom; ``None`` = the whole image). Results are plain JSON-able values.

Batch variants (``detect_batch`` ...) default to loops over the single-item methods; a
model backend (the ``hf`` backend: detectors, VQA, CLIP, depth models loaded once)
overrides them to run one forward pass per batch. The server groups requests by op so
those batches actually form.

A backend signals a problem the program should see (bad argument, missing LLM) by raising
:class:`ToolError`; its message becomes the exception text in the program.

The ``vlm`` mode (:mod:`vpd.tools.backends.vlm`): a backend built with a VLM (``vqa=PATH``)
sends the batches of the ops that VLM takes (``simple_query``, ``verify_property``,
``best_text_match``) to it; the server only calls the batch methods, so every call of those
ops goes to the VLM, while the single-item methods stay the backend's own answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vpd.errors import ToolsUnavailable
from vpd.llm.base import LLM, GenParams
from vpd.tools.protocol import Box


class ToolError(Exception):
    """A tool op failed in a way the program should see (its message is shown as is)."""


@dataclass
class ImageData:
    """One decoded image plus a per-image memo for backends (e.g. a segmentation)."""

    path: str
    pil: Image.Image  # RGB
    rgb: np.ndarray  # H x W x 3 uint8, top row first
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @classmethod
    def load(cls, path: str | Path) -> ImageData:
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ToolError(f"cannot read image {path}: {e}") from None
        return cls(str(path), pil, np.asarray(pil))

    @classmethod
    def from_array(cls, rgb: np.ndarray, path: str = "<array>") -> ImageData:
        rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        return cls(path, Image.fromarray(rgb), rgb)

    def clip(self, box: Box | None) -> Box:
        """``box`` clipped to the image (``None`` -> the whole image); never inverted."""
        if box is None:
            return (0, 0, self.width, self.height)
        left, lower, right, upper = (int(v) for v in box)
        left = min(max(left, 0), self.width)
        right = min(max(right, left), self.width)
        lower = min(max(lower, 0), self.height)
        upper = min(max(upper, lower), self.height)
        return (left, lower, right, upper)

    def rows_cols(self, box: Box | None) -> tuple[slice, slice]:
        """Array slices (rows top-down, columns) of a ViperGPT box."""
        left, lower, right, upper = self.clip(box)
        return slice(self.height - upper, self.height - lower), slice(left, right)

    def crop_array(self, box: Box | None) -> np.ndarray:
        rows, cols = self.rows_cols(box)
        return self.rgb[rows, cols]


class VlmAnswerer(Protocol):
    """What a backend needs of its VLM (:class:`vpd.tools.backends.vlm.VlmTools` fits)."""

    ops: frozenset[str]

    def run(self, op: str, items: list[tuple[ImageData, Box | None, dict[str, Any]]]) -> list[Any]:
        """Results of ``op`` for ``(image, patch, args)`` items, exceptions in place."""
        ...

    def close(self) -> None: ...


class Backend:
    """Base class of tool backends. Subclasses implement the single-item methods.

    ``llm`` (any :class:`vpd.llm.base.LLM`) serves ``llm_query``; without one the op
    fails with a clear message instead of inventing an answer. ``vlm``, when set, answers
    the batches of the ops it takes (the ``vlm`` mode, see the module docstring).
    """

    name = "base"

    def __init__(self, llm: LLM | None = None, vlm: VlmAnswerer | None = None) -> None:
        self.llm = llm
        self.vlm = vlm

    # ---------------------------------------------------------------- single items
    def detect(self, image: ImageData, box: Box | None, name: str) -> list[Box]:
        """Boxes (absolute pixels, inside ``box``) of every ``name`` in the region."""
        raise NotImplementedError

    def verify_property(self, image: ImageData, box: Box | None, name: str, prop: str) -> bool:
        """Whether the ``name`` in the region has property ``prop`` (e.g. 'red', 'large')."""
        raise NotImplementedError

    def best_text_match(self, image: ImageData, box: Box | None, options: list[str]) -> str:
        """The option that best describes the region (a zero-shot classifier)."""
        raise NotImplementedError

    def match_score(self, image: ImageData, box: Box | None, text: str) -> float:
        """How well ``text`` describes the region (higher is better; CLIP-like)."""
        raise NotImplementedError

    def answer(self, image: ImageData, box: Box | None, question: str) -> str:
        """A short answer to a basic question about the region (VQA)."""
        raise NotImplementedError

    def depth(self, image: ImageData, box: Box | None) -> float:
        """Median depth of the region (smaller = closer to the camera)."""
        raise NotImplementedError

    def llm_query(self, question: str, long_answer: bool = True) -> str:
        """Answer a text-only question with the configured LLM."""
        if self.llm is None:
            raise ToolError("llm_query needs an LLM (--llm ...)")
        system = (
            "Answer the question with general knowledge."
            if long_answer
            else "Answer the question in one to three words, no explanation."
        )
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ]
        params = GenParams(n=1, temperature=0.0, max_tokens=256 if long_answer else 16)
        out = self.llm.generate([messages], params)
        return out[0][0].text.strip() if out and out[0] else ""

    # ---------------------------------------------------------------- batches
    # Each item is the argument tuple of the single-item method, without ``self``.
    def detect_batch(self, items: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
        return each_item(self.detect, items)

    def verify_property_batch(
        self, items: list[tuple[ImageData, Box | None, str, str]]
    ) -> list[Any]:
        vlm = self.vlm_for("verify_property")
        if vlm is not None:
            args = [(img, box, {"name": n, "prop": p}) for img, box, n, p in items]
            return vlm.run("verify_property", args)
        return each_item(self.verify_property, items)

    def best_text_match_batch(
        self, items: list[tuple[ImageData, Box | None, list[str]]]
    ) -> list[Any]:
        vlm = self.vlm_for("best_text_match")
        if vlm is not None:
            args = [(img, box, {"options": o}) for img, box, o in items]
            return vlm.run("best_text_match", args)
        return each_item(self.best_text_match, items)

    def match_score_batch(self, items: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
        return each_item(self.match_score, items)

    def answer_batch(self, items: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
        vlm = self.vlm_for("simple_query")
        if vlm is not None:
            args = [(img, box, {"question": q}) for img, box, q in items]
            return vlm.run("simple_query", args)
        return each_item(self.answer, items)

    def depth_batch(self, items: list[tuple[ImageData, Box | None]]) -> list[Any]:
        return each_item(self.depth, items)

    def llm_query_batch(self, items: list[tuple[str, bool]]) -> list[Any]:
        return each_item(self.llm_query, items)

    # ---------------------------------------------------------------- the vlm mode
    def vlm_for(self, op: str) -> VlmAnswerer | None:
        """The VLM that answers ``op``'s batches, or None (the backend's own method does)."""
        return self.vlm if self.vlm is not None and op in self.vlm.ops else None

    def ask_vlm(self, op: str, image: ImageData, box: Box | None, args: dict[str, Any]) -> Any:
        """One VLM op on one patch, its error raised (for backends whose op IS the VLM)."""
        if self.vlm is None:
            raise ToolError(f"{op} needs a VLM (--tool-opt vqa=PATH)")
        result = self.vlm.run(op, [(image, box, args)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        """Free models / LLM clients the backend owns."""
        if self.vlm is not None:
            self.vlm.close()
        if self.llm is not None:
            self.llm.close()


def each_item(fn: Any, items: list[tuple]) -> list[Any]:
    """Per-item results; an exception is returned in place so one bad item fails alone."""
    out: list[Any] = []
    for it in items:
        try:
            out.append(fn(*it))
        except ToolsUnavailable:
            raise  # the backend itself is broken: stop the stage, not this item
        except Exception as e:  # noqa: BLE001 - the server turns it into that item's error
            out.append(e)
    return out
