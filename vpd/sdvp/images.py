"""Images as the SDVP steps read them: regions in pixels, and the last few decoded images
(a sub-task's image is often another's too: the teacher and sft steps each keep a cache)."""

from __future__ import annotations

from collections import OrderedDict

from PIL import Image

from vpd.tools.protocol import Box


def pixel_box(region: list[float], size: tuple[int, int]) -> Box:
    """A region in 0..1 (as traces store it) in the image's pixels (ViperGPT, y up)."""
    w, h = size
    left, lower, right, upper = region
    return (round(left * w), round(lower * h), round(right * w), round(upper * h))


class ImageCache:
    """The last few decoded images (a sub-task's image is often another's too)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._cache: OrderedDict[str, Image.Image] = OrderedDict()

    def get(self, path: str) -> Image.Image:
        im = self._cache.get(path)
        if im is None:
            with Image.open(path) as f:
                im = f.convert("RGB")
            self._cache[path] = im
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return im
