"""A tiny client-side tool API for sandbox tests (the real one is vpd.tools.api)."""

from __future__ import annotations

from typing import Any


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
    }
