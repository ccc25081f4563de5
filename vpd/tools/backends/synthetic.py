"""Classical-CV tool backend for flat-coloured shape scenes (no models, no ground truth).

Everything is read from the PIXELS; the scene graph and question metadata are never seen.
It works on any image of flat shapes on a plain background, drawn by anyone (any
background colour, anti-aliased or not, any size), not only on `vpd data synth` output.

Pipeline, once per image (memoized in :class:`ImageData.memo`):

1. background = median colour of the image border; foreground = pixels whose largest
   channel difference from it exceeds ``FG_THRESHOLD``;
2. connected components (8-connected) of the foreground; specks smaller than
   ``MIN_AREA_FRAC`` of the image are dropped (noise, stray anti-aliasing);
3. per object, on the pixels inside the asked region:

   - colour: the median colour of the eroded mask (so anti-aliased edge pixels, a blend
     with the background, do not count), named by HSV: low saturation -> white / gray /
     black by value; otherwise by hue: red < 15 deg <= orange < 45 <= yellow < 75 <= green
     < 170 <= blue < 260 <= purple < 330 <= red;
   - shape: concave (solidity < 0.8) -> star; then by how well the pixels fill the
     tightest enclosing triangle (-> triangle), circle (-> circle) and rectangle (->
     square, or rectangle above aspect ratio 1.2); an elongated round outline -> ellipse;
     else the vertex count of ``approxPolyDP`` on the convex hull (5 pentagon, 6 hexagon);
   - size: ``large`` when the longer side of its box is at least ``LARGE_EXTENT`` (1/6) of
     the image's shorter side, else ``small`` (synthetic scenes: small ~ 0.11, large ~ 0.22).
     "big"/"huge" are read as large, "tiny"/"little" as small.

An object belongs to a region when the centre of its box lies inside it (the same rule as
left/right/above/below), or when it covers at least half of the region (a zoom-in); what is
reported (box, colour, shape, size) is then what is visible inside the region. Depth is estimated
from apparent size (bigger = closer): ``1 - extent`` of the region's largest object, 1.0
for an empty region. Limitation: touching objects of different colours merge into one.

The ``vlm`` mode (``vqa=PATH``, see :mod:`vpd.tools.backends.vlm`): ``simple_query``,
``verify_property`` and ``best_text_match`` (``vqa_ops`` picks which) are asked of that VLM
instead; finding, counting and depth stay classical CV. That is where ``vpd sdvp`` distills
a teacher into the tools.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from vpd.llm.base import LLM
from vpd.tools.backends.base import Backend, ImageData, ToolError
from vpd.tools.backends.vlm import VLM_OPS, make_vlm
from vpd.tools.protocol import Box

FG_THRESHOLD = 24  # max |channel - background| above which a pixel is foreground
MIN_AREA_FRAC = 0.0002  # components smaller than this fraction of the image are noise
MIN_AREA_PX = 12
LARGE_EXTENT = 1 / 6  # box side / image side at or above which an object is "large"
SOLIDITY_STAR = 0.8  # pixels / convex hull below which an outline is a star
TRIANGLE_FILL = 0.69  # pixels / min enclosing triangle (triangles >= 0.71, others <= 0.66)
CIRCLE_FILL = 0.88  # pixels / min enclosing circle (circles >= 0.86, hexagons <= 0.88)
RECT_FILL = 0.84  # pixels / min-area rectangle (squares >= 0.84, others <= 0.83)
SQUARE_ASPECT = 1.2
ELLIPSE_ASPECT = 1.3

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "gray", "black")
SHAPES = ("circle", "square", "rectangle", "triangle", "star", "pentagon", "hexagon", "ellipse")
SIZES = ("small", "large")

_WORDS: dict[str, tuple[str, str]] = {}
for _c in COLORS:
    _WORDS[_c] = ("color", _c)
for _w, _c in (("grey", "gray"), ("violet", "purple"), ("colour", "")):
    if _c:
        _WORDS[_w] = ("color", _c)
for _s in SHAPES:
    _WORDS[_s] = ("shape", _s)
    _WORDS[_s + "s"] = ("shape", _s)
for _w, _s in (
    ("circular", "circle"),
    ("round", "circle"),
    ("triangular", "triangle"),
    ("rectangular", "rectangle"),
    ("hexagonal", "hexagon"),
    ("pentagonal", "pentagon"),
    ("oval", "ellipse"),
    ("ovals", "ellipse"),
    ("ellipses", "ellipse"),
):
    _WORDS[_w] = ("shape", _s)
for _w in ("small", "tiny", "little", "smaller", "smallest"):
    _WORDS[_w] = ("size", "small")
for _w in ("large", "big", "huge", "larger", "bigger", "largest", "biggest"):
    _WORDS[_w] = ("size", "large")
# Nouns that name any object, and words that carry no attribute.
_GENERIC = {
    *"shape shapes object objects thing things item items figure figures one ones".split(),
}
_FILLER = {
    *(
        "a an the any some all of in on image picture scene photo colored coloured shaped "
        "sized that is are there this these those it its or and color colour size type kind"
    ).split(),
}
_RELATIONS = (
    ("to the left of", "left"),
    ("on the left of", "left"),
    ("left of", "left"),
    ("to the right of", "right"),
    ("on the right of", "right"),
    ("right of", "right"),
    ("above", "above"),
    ("over", "above"),
    ("on top of", "above"),
    ("below", "below"),
    ("under", "below"),
    ("beneath", "below"),
    ("underneath", "below"),
)

Desc = dict[str, set[str]]


@dataclass
class Obj:
    """One object as seen inside a region (box clipped to it)."""

    box: Box  # ViperGPT pixels (left, lower, right, upper)
    color: str
    shape: str
    size: str
    area: int  # pixels inside the region
    extent: float  # longer box side / image's shorter side

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    def attr(self, key: str) -> str:
        return str(getattr(self, key))


# ----------------------------------------------------------------------------- language


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def parse_description(text: str, strict: bool = True) -> Desc | None:
    """'large red circles' -> {'size': {'large'}, 'color': {'red'}, 'shape': {'circle'}}.

    ``strict``: a word that names neither an attribute nor a generic object ('dog')
    makes the description unknown (``None``): the detector knows no such thing.
    """
    desc: Desc = {}
    for w in _tokens(text):
        if w in _WORDS:
            key, val = _WORDS[w]
            desc.setdefault(key, set()).add(val)
        elif w in _GENERIC or w in _FILLER:
            continue
        elif strict:
            return None
    return desc


def _matches(o: Obj, desc: Desc) -> bool:
    return all(o.attr(k) in vals for k, vals in desc.items())


def _score(o: Obj, desc: Desc) -> int:
    return sum(1 if o.attr(k) in vals else -1 for k, vals in desc.items())


# ----------------------------------------------------------------------------- pixels


def _segment(image: ImageData) -> tuple[np.ndarray, int, np.ndarray]:
    """(label image, number of labels incl. background 0, cv2 component stats), memoized."""
    memo = image.memo.get("synthetic.labels")
    if memo is not None:
        return memo
    rgb = image.rgb
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).reshape(-1, 3)
    bg = np.median(border, axis=0).astype(np.int16)
    diff = np.abs(rgb.astype(np.int16) - bg).max(axis=2)
    fg = (diff > FG_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    min_area = max(MIN_AREA_PX, MIN_AREA_FRAC * image.width * image.height)
    small = np.nonzero(stats[:, cv2.CC_STAT_AREA] < min_area)[0]
    if len(small):
        labels[np.isin(labels, small)] = 0
    image.memo["synthetic.labels"] = (labels, n, stats)
    return labels, n, stats


def color_name(rgb: np.ndarray | tuple[int, int, int]) -> str:
    """Name of one RGB colour (see the module docstring for the hue bands)."""
    px = np.uint8([[list(rgb)]])
    h, s, v = (int(x) for x in cv2.cvtColor(px, cv2.COLOR_RGB2HSV_FULL)[0, 0])
    hue = h * 360 / 256
    if s < 70 or v < 50:
        if v < 60:
            return "black"
        return "white" if v > 200 and s < 40 else "gray"
    for limit, name in ((15, "red"), (45, "orange"), (75, "yellow"), (170, "green")):
        if hue < limit:
            return name
    if hue < 260:
        return "blue"
    return "purple" if hue < 330 else "red"


def shape_name(mask: np.ndarray) -> str:
    """Shape of one binary mask (uint8, object = nonzero).

    Fills compare the PIXEL count with fitted outlines grown by half a pixel (the contour
    runs through boundary pixel centres), so small objects are measured without bias.
    """
    m = cv2.copyMakeBorder(mask, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return "shape"
    c = max(contours, key=cv2.contourArea)
    pix = float(np.count_nonzero(m))
    if pix < 9:
        return "circle"  # a dot
    hull = cv2.convexHull(c)
    solidity = pix / _grown(cv2.contourArea(hull), cv2.arcLength(hull, True))
    (_, _), radius = cv2.minEnclosingCircle(c)
    circle_fill = pix / (math.pi * (radius + 0.5) ** 2)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    rect_fill = pix / ((rw + 1) * (rh + 1))
    aspect = (max(rw, rh) + 1) / (min(rw, rh) + 1)
    tri_area, tri = cv2.minEnclosingTriangle(c.astype(np.float32))
    tri = tri.reshape(3, 2)
    tri_perimeter = sum(float(np.linalg.norm(tri[k] - tri[(k + 1) % 3])) for k in range(3))
    tri_fill = pix / _grown(tri_area, tri_perimeter)
    if solidity < SOLIDITY_STAR:
        return "star"
    if tri_fill >= TRIANGLE_FILL:
        return "triangle"
    if circle_fill >= CIRCLE_FILL:
        return "circle"
    if rect_fill >= RECT_FILL:
        return "square" if aspect <= SQUARE_ASPECT else "rectangle"
    if aspect > ELLIPSE_ASPECT and 0.74 <= rect_fill < RECT_FILL and solidity > 0.95:
        return "ellipse"
    n = len(cv2.approxPolyDP(hull, 0.04 * cv2.arcLength(hull, True), True))
    if (circle_fill >= 0.86 and n != 6) or circle_fill >= 0.87:
        return "circle"  # a small round blob: its outline is too coarse for corners
    if n == 6:
        return "hexagon"
    if n == 5:
        return "pentagon"
    if n == 4:
        return "square" if aspect <= SQUARE_ASPECT else "rectangle"
    if n == 3:
        return "triangle"
    return "hexagon" if n > 6 else "shape"


def _grown(area: float, perimeter: float) -> float:
    """Area of a convex outline grown by half a pixel all round (Steiner formula)."""
    return max(area + 0.5 * perimeter + math.pi / 4, 1e-9)


def _describe(image: ImageData, mask: np.ndarray, top: int, left: int) -> Obj:
    """An object from its mask crop whose top-left pixel is (top, left) in the image."""
    rows, cols = np.nonzero(mask)
    t, b = top + int(rows.min()), top + int(rows.max())
    lft, rgt = left + int(cols.min()), left + int(cols.max())
    h = image.height
    box = (int(lft), int(h - b - 1), int(rgt + 1), int(h - t))
    crop = image.rgb[top : top + mask.shape[0], left : left + mask.shape[1]]
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=1)
    if int(inner.sum()) < 5:
        inner = mask
    color = color_name(np.median(crop[inner > 0], axis=0).astype(np.uint8))
    extent = max(rgt - lft + 1, b - t + 1) / min(image.width, image.height)
    return Obj(
        box=box,
        color=color,
        shape=shape_name(mask),
        size="large" if extent >= LARGE_EXTENT else "small",
        area=int(mask.sum()),
        extent=round(extent, 4),
    )


def objects_in(image: ImageData, box: Box | None) -> list[Obj]:
    """Every object in the region, left to right (memoized per image and region)."""
    region = image.clip(box)
    key = ("synthetic.objects", region)
    if key in image.memo:
        return image.memo[key]
    labels, n, stats = _segment(image)
    rows, cols = image.rows_cols(region)
    sub = labels[rows, cols]
    out: list[Obj] = []
    if sub.size:
        inside = np.bincount(sub.ravel(), minlength=n)
        for lab in np.nonzero(inside)[0]:
            if lab == 0:
                continue
            # In the region when the centre of its whole box is (the same centre rule as
            # left/right/above/below), or when it fills half of the region (a zoom-in).
            x, y, bw, bh = (int(v) for v in stats[lab, :4])
            cx, cy = x + bw / 2, image.height - (y + bh / 2)
            centred = region[0] <= cx < region[2] and region[1] <= cy < region[3]
            if not centred and inside[lab] * 2 < sub.size:
                continue
            mask = (sub == lab).astype(np.uint8)
            r, c = np.nonzero(mask)
            t, b, lft, rgt = r.min(), r.max() + 1, c.min(), c.max() + 1
            out.append(_describe(image, mask[t:b, lft:rgt], rows.start + t, cols.start + lft))
    out.sort(key=lambda o: (o.box[0], -o.box[3]))
    image.memo[key] = out
    return out


def _dominant(objs: list[Obj]) -> Obj | None:
    return max(objs, key=lambda o: o.area) if objs else None


# ----------------------------------------------------------------------------- backend


class SyntheticBackend(Backend):
    """Tools for flat shape scenes by classical CV (see the module docstring)."""

    name = "synthetic"

    def __init__(
        self,
        llm: LLM | None = None,
        *,
        vqa: str | None = None,
        vqa_ops: str | list[str] = ",".join(VLM_OPS),
        vqa_view: str = "crop",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 10,
    ) -> None:
        vlm = make_vlm(
            vqa,
            ops=vqa_ops,
            view=vqa_view,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        super().__init__(llm, vlm)

    def detect(self, image: ImageData, box: Box | None, name: str) -> list[Box]:
        desc = parse_description(_text(name, "name"))
        if desc is None:
            return []
        return [o.box for o in objects_in(image, box) if _matches(o, desc)]

    def verify_property(self, image: ImageData, box: Box | None, name: str, prop: str) -> bool:
        desc = parse_description(_text(name, "name"))
        want = parse_description(_text(prop, "property"), strict=False)
        if desc is None or not want:
            return False
        return any(_matches(o, want) for o in objects_in(image, box) if _matches(o, desc))

    def best_text_match(self, image: ImageData, box: Box | None, options: list[str]) -> str:
        opts = _options(options)
        o = _dominant(objects_in(image, box))
        if o is None:
            return opts[0]
        scores = [_score(o, parse_description(t, strict=False) or {}) for t in opts]
        return opts[scores.index(max(scores))]

    def match_score(self, image: ImageData, box: Box | None, text: str) -> float:
        o = _dominant(objects_in(image, box))
        desc = parse_description(_text(text, "content"), strict=False) or {}
        return float(_score(o, desc)) if o is not None else -float(len(desc))

    def depth(self, image: ImageData, box: Box | None) -> float:
        o = _dominant(objects_in(image, box))
        return 1.0 if o is None else round(1.0 - min(o.extent, 1.0), 4)

    def answer(self, image: ImageData, box: Box | None, question: str) -> str:
        return _Answerer(objects_in(image, box)).answer(_text(question, "question"))


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ToolError(f"{what} must be a string, got {type(v).__name__}")
    return v


def _options(options: Any) -> list[str]:
    if isinstance(options, str):
        options = [options]
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ToolError("options must be a non-empty list of strings")
    return options


# ----------------------------------------------------------------------------- simple_query

_ATTR_Q = re.compile(
    r"^(?:what|which)\s+(?:is\s+the\s+)?(colou?r|shape|size)\b(?:\s+of)?"
    r"|^how\s+(?:big|large)\b"
)
_SIZE_Q = re.compile(r"^(?:is|are)\s+(.*?)\s*\b(?:small|big|large)\s+or\s+(?:small|big|large)\b")
_COUNT_Q = re.compile(r"^(?:how\s+many|what\s+is\s+the\s+number\s+of|count)\b")
_EXISTS_Q = re.compile(
    r"^(?:is\s+there|are\s+there|does\s+the\s+image\s+(?:contain|have|show)|do\s+you\s+see|"
    r"can\s+you\s+see)\b"
)
_YESNO_Q = re.compile(r"^(?:is|are|does|do)\s+(?:the|this|these|it|that)\b")


class _Answerer:
    """Answers the basic question forms on the objects of one region."""

    def __init__(self, objs: list[Obj]) -> None:
        self.objs = objs

    def answer(self, question: str) -> str:
        q = " ".join(question.lower().replace("?", " ").replace(",", " ").split()).strip(" .")
        if ". " in q:
            # "There is one shape left of the X. What color is it?": the object is named
            # in the first sentence, the question about "it" in the last.
            ctx, _, q = q.rpartition(". ")
            if not any(w in _WORDS or w in _GENERIC for w in _tokens(q)):
                named = re.sub(r"^.*?\bthere\s+(?:is|are)\s+(?:one|an?)?\s*", "", ctx)
                q = f"{q} the {named}"
        m = _SIZE_Q.search(q)
        if m:
            o = self._target(m.group(1))
            return o.size if o else "nothing"
        m = _ATTR_Q.search(q)
        if m:
            key = {"color": "color", "colour": "color", "shape": "shape"}.get(
                m.group(1) or "", "size"
            )
            o = self._target(q[m.end() :])
            return o.attr(key) if o else "nothing"
        m = _COUNT_Q.search(q)
        if m:
            return str(len(self._select(q[m.end() :])))
        m = _EXISTS_Q.search(q)
        if m:
            return "yes" if self._select(q[m.end() :]) else "no"
        m = _YESNO_Q.search(q)
        if m:
            return self._yesno(q[m.end() :])
        o = _dominant(self.objs)
        return f"{o.color} {o.shape}" if o else "nothing"

    def _select(self, phrase: str) -> list[Obj]:
        """Objects the phrase describes, with one optional spatial relation."""
        for words, rel in _RELATIONS:
            m = re.search(rf"\b{words}\b", phrase)
            if m:
                target = parse_description(phrase[: m.start()], strict=False) or {}
                ref_desc = parse_description(phrase[m.end() :], strict=False) or {}
                refs = [o for o in self.objs if _matches(o, ref_desc)]
                ref = _dominant(refs)
                if ref is None:
                    return []
                return [
                    o
                    for o in self.objs
                    if o is not ref and _matches(o, target) and _side(o, ref, rel)
                ]
        desc = parse_description(phrase, strict=False) or {}
        return [o for o in self.objs if _matches(o, desc)]

    def _target(self, phrase: str) -> Obj | None:
        """The one object a phrase refers to: the largest match, else the largest object."""
        return _dominant(self._select(phrase)) or _dominant(self.objs)

    def _yesno(self, rest: str) -> str:
        # "Is the red shape a circle?": the LAST attribute word is the property asked
        # about, the words before it describe the object.
        words = _tokens(rest)
        idx = [i for i, w in enumerate(words) if w in _WORDS]
        if not idx:
            return "yes" if self._select(rest) else "no"
        key, val = _WORDS[words[idx[-1]]]
        o = _dominant(self._select(" ".join(words[: idx[-1]])))
        return "yes" if o is not None and o.attr(key) == val else "no"


def _side(o: Obj, ref: Obj, rel: str) -> bool:
    if rel == "left":
        return o.cx < ref.cx
    if rel == "right":
        return o.cx > ref.cx
    if rel == "above":
        return o.cy > ref.cy
    return o.cy < ref.cy
