"""Synthetic CLEVR-like shape scenes with ground-truth scene graphs and templated questions.

The embedded default data set: it needs no download, renders in milliseconds, and every
answer is derived from a known scene graph, so the whole pipeline can be checked end to end.

Scenes
------
A ``size`` x ``size`` PNG (default 256) with a plain light-grey background (230, 230, 230)
and 3-7 flat-coloured objects, drawn without anti-aliasing so every object pixel has exactly
its colour:

- shapes: ``circle``, ``square``, ``triangle`` (isosceles, pointing up), ``star`` (5 points);
- colours (fully saturated, hues >= 30 degrees apart): ``red`` (255,0,0), ``orange``
  (255,128,0), ``yellow`` (255,255,0), ``green`` (0,200,0), ``blue`` (0,0,255),
  ``purple`` (160,0,255);
- sizes: ``small`` (r = 14 px at size 256) and ``large`` (r = 28 px); every shape fills a
  2r x 2r box, so size is read from the box extent (about 29 vs 57 px), not from the area.

Placement is occlusion-free: object boxes are at least 6 px apart and 4 px from the border
(rejection sampling), and any two box centres differ by at least 4 px on BOTH axes, so
left/right and above/below are never ties.

Coordinates (ViperGPT convention, the one ``ImagePatch`` uses)
---------------------------------------------------------------
x grows to the right and y grows UPWARD from the image bottom. An object's
``box = [left, lower, right, upper]`` is its tight pixel box: columns ``left .. right-1``
and, in top-down image rows, ``height-upper .. height-lower-1``; hence ``lower < upper`` and
``image[height-upper:height-lower, left:right]`` crops it exactly. ``x, y`` are the box
centre, ``((left+right)/2, (lower+upper)/2)``: what ``horizontal_center`` and
``vertical_center`` return. ``r`` is the nominal half-extent in pixels.

Relations
---------
"A is left of X" means A's centre x < X's centre x (right: >, above: A's y > X's y,
below: <); all other objects are candidates, whatever their distance. A question that
asks about "the shape left of X" is generated ONLY when exactly one object qualifies, so a
program may simply take the one object on that side. Counting questions ("How many shapes
are above the red circle?") count every qualifying object (0 is a valid answer).

Descriptions
------------
A referenced object is described by a subset of (size, colour, shape), e.g. "the large
blue square", "the red shape", "the small object"; a question is only asked when that
description matches exactly one object in the scene.

Question types (``meta["qtype"]``) and templates (``meta["template"]``)
----------------------------------------------------------------------
- count: ``count_<attrs>`` e.g. "How many red shapes are there?", "How many circles are
  there?", "How many large blue squares are in the image?" -> "0".."7"
- exists: ``exists_<attrs>`` e.g. "Is there a green triangle?" -> yes/no (balanced)
- attribute: ``attribute_color|shape|size`` e.g. "What color is the large star?", "What
  shape is the small purple object?", "What size is the orange circle?"
- relation: ``relation_<dir>_<color|shape>`` e.g. "What color is the shape to the left of
  the blue square?" (referent described by colour and/or shape)
- compare: ``compare_<color|shape|size>_<more|fewer>`` e.g. "Are there more red shapes than
  blue shapes?" (equal counts -> "no")
- multihop: ``multihop_attr_<dir>_<q>`` ("What color is the shape left of the small
  square?", the referent's description includes its size), ``multihop_count_<dir>`` ("How
  many shapes are above the red circle?", "How many red shapes are below the large star?"),
  ``multihop_exists_<dir>`` ("Is there a red shape to the left of the small circle?")
- yesno: ``yesno_color|shape|size`` e.g. "Is the triangle blue?", "Is the red shape a
  circle?", "Is the blue circle small?" (balanced)

Answers are one-element lists of lowercase canonical strings: digits for numbers,
"yes"/"no", or a colour/shape/size word. ``meta["phrasing"]`` is the index of the wording.

Files and ``--n``
-----------------
``--n`` is the number of QUESTIONS; scenes hold ``questions_per_scene`` each (default 5),
so ``ceil(n / questions_per_scene)`` images are drawn. Question types rotate over the
global question index, so the set is balanced over qtypes. Output: ``DIR/images/sNNNNNN.png``,
``DIR/train.jsonl`` and ``DIR/test.jsonl`` (``vpd.records.Question``, ``image`` relative to
DIR, ``dataset="synth"``); the split is by image, never sharing one. Scene i depends only
on (seed, i, size, object counts), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator, with_config
from typing_extensions import TypedDict  # pydantic validates it (typing's on 3.12+)

from vpd.errors import VpdError
from vpd.options import force_field, progress_field
from vpd.progress import progress_bar
from vpd.records import Question
from vpd.store import (
    atomic_file,
    atomic_write_json,
    ensure_meta,
    meta_path,
    read_meta,
    set_aside,
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "purple": (160, 0, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (230, 230, 230)
QTYPES: tuple[str, ...] = (
    "count",
    "exists",
    "attribute",
    "relation",
    "compare",
    "multihop",
    "yesno",
)
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
ATTRS: tuple[str, ...] = ("size", "color", "shape")

_BASE = 256  # radii below are for a 256 px image and scale with ``size``
_RADIUS = {"small": 14, "large": 28}
_BOX_GAP = 6  # px between object boxes
_BORDER = 4  # px between a box and the image border
_CENTER_GAP = 4  # min |dx| and |dy| between box centres: no left/right/above/below ties
_STAR_INNER = 0.45

Obj = dict[str, Any]
Desc = dict[str, str]


# ----------------------------------------------------------------------------- scenes


def _radius(size_word: str, width: int) -> int:
    return max(4, round(_RADIUS[size_word] * width / _BASE))


def make_scene(
    rng: random.Random,
    width: int = 256,
    height: int | None = None,
    min_objects: int = 3,
    max_objects: int = 7,
) -> dict[str, Any]:
    """Sample an occlusion-free scene: ``{"width", "height", "objects": [...]}``.

    Objects carry ``shape, color, size, r`` and a nominal centre; the exact pixel box (and
    the box centre ``x, y``) is filled in by :func:`render_scene`, which
    :func:`scene_and_image` calls for you.
    """
    height = height or width
    for _ in range(1000):
        n = rng.randint(min_objects, max_objects)
        objs: list[Obj] = []
        for _ in range(n):
            placed = False
            for _ in range(200):
                size = rng.choice(SIZES)
                r = _radius(size, width)
                lo = r + _BORDER
                if 2 * lo > min(width, height):
                    raise VpdError(f"image size {width} is too small for the objects")
                cx = rng.randint(lo, width - lo - 1)
                cy = rng.randint(lo, height - lo - 1)  # top-down while placing
                if all(_apart(cx, cy, r, o) for o in objs):
                    objs.append(
                        {
                            "shape": rng.choice(SHAPES),
                            "color": rng.choice(list(COLORS)),
                            "size": size,
                            "r": r,
                            "_cx": cx,
                            "_cy": cy,
                        }
                    )
                    placed = True
                    break
            if not placed:
                break  # too crowded: draw a new object count
        if len(objs) == n:
            return {"width": width, "height": height, "objects": objs}
    raise VpdError(f"could not place {min_objects}..{max_objects} objects in {width}x{height}")


def _apart(cx: int, cy: int, r: int, o: Obj) -> bool:
    gap_x = abs(cx - o["_cx"]) - r - o["r"]
    gap_y = abs(cy - o["_cy"]) - r - o["r"]
    boxes_apart = max(gap_x, gap_y) >= _BOX_GAP
    # Margin of 1 px on top of the centre gap absorbs rounding of polygon pixels.
    centres_apart = min(abs(cx - o["_cx"]), abs(cy - o["_cy"])) >= _CENTER_GAP + 1
    return boxes_apart and centres_apart


def _polygon(shape: str, cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    """Vertices in image coords (y down), centred so the vertex box centre is (cx, cy)."""
    if shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        pts = [(0, -r), (r, r), (-r, r)]
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * _STAR_INNER
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        # Scale so the star fills its 2r x 2r box like the other shapes.
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = 2 * r / (max(xs) - min(xs)), 2 * r / (max(ys) - min(ys))
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        pts = [((x - mx) * sx, (y - my) * sy) for x, y in pts]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(cx + x, cy + y) for x, y in pts]


def render_scene(scene: dict[str, Any]) -> Image.Image:
    """Draw ``scene`` (RGB, no anti-aliasing) and fill in each object's exact pixel
    ``box`` and box centre ``x, y`` in ViperGPT coordinates (y up). Mutates ``scene``."""
    w, h = scene["width"], scene["height"]
    img = Image.new("RGB", (w, h), BACKGROUND)
    labels = Image.new("L", (w, h), 0)
    draw, ldraw = ImageDraw.Draw(img), ImageDraw.Draw(labels)
    for i, o in enumerate(scene["objects"], 1):
        cx, cy, r = o.get("_cx"), o.get("_cy"), o["r"]
        if cx is None:  # a scene read back from JSON: undo the half-pixel of the box centre
            cx, cy = round(o["x"] - 0.5), round(h - o["y"] - 0.5)
        fill = COLORS[o["color"]]
        for d, f in ((draw, fill), (ldraw, i)):
            if o["shape"] == "circle":
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=f)
            else:
                d.polygon(_polygon(o["shape"], cx, cy, r), fill=f)
    lab = np.asarray(labels)
    for i, o in enumerate(scene["objects"], 1):
        rows, cols = np.nonzero(lab == i)
        top, bottom = int(rows.min()), int(rows.max())
        left, right = int(cols.min()), int(cols.max()) + 1
        lower, upper = h - bottom - 1, h - top
        o["box"] = [left, lower, right, upper]
        o["x"], o["y"] = (left + right) / 2, (lower + upper) / 2
        o.pop("_cx", None)
        o.pop("_cy", None)
    return img


def _clean_layout(scene: dict[str, Any]) -> bool:
    objs = scene["objects"]
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if min(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) < _CENTER_GAP:
                return False
    return True


def scene_and_image(
    rng: random.Random, width: int = 256, min_objects: int = 3, max_objects: int = 7
) -> tuple[dict[str, Any], Image.Image]:
    """A rendered scene whose final box centres keep the no-tie guarantee."""
    while True:
        scene = make_scene(rng, width, width, min_objects, max_objects)
        img = render_scene(scene)
        if _clean_layout(scene):
            ordered = [
                {k: o[k] for k in ("shape", "color", "size", "x", "y", "r", "box")}
                for o in scene["objects"]
            ]
            return {"width": width, "height": width, "objects": ordered}, img


# ----------------------------------------------------------------------------- language


_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}


def _matches(o: Obj, desc: Desc) -> bool:
    return all(o[k] == v for k, v in desc.items())


def _count(objs: Sequence[Obj], desc: Desc) -> int:
    return sum(_matches(o, desc) for o in objs)


def _phrase(desc: Desc, rng: random.Random, plural: bool = False) -> str:
    """'large blue square', 'red shape', 'small objects'... (no article)."""
    words = [desc[k] for k in ("size", "color") if k in desc]
    if "shape" in desc:
        noun = _PLURAL[desc["shape"]] if plural else desc["shape"]
    else:
        noun = rng.choice(["shapes", "objects"] if plural else ["shape", "object"])
    return " ".join([*words, noun])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _unique_descs(
    target: Obj, objs: Sequence[Obj], attrs: Sequence[str], require: str | None = None
) -> list[Desc]:
    """Every non-empty description over ``attrs`` that matches ``target`` alone."""
    out = []
    for mask in range(1, 1 << len(attrs)):
        keys = [a for j, a in enumerate(attrs) if mask >> j & 1]
        if require is not None and require not in keys:
            continue
        desc = {k: target[k] for k in keys}
        if _count(objs, desc) == 1:
            out.append(desc)
    return out


def _pick_desc(rng: random.Random, descs: list[Desc]) -> Desc:
    """Prefer short descriptions (like people), but not always."""
    shortest = min(len(d) for d in descs)
    pool = [d for d in descs if len(d) == shortest] if rng.random() < 0.6 else descs
    return rng.choice(pool)


def _related(objs: Sequence[Obj], ref: Obj, direction: str) -> list[Obj]:
    """Objects whose centre lies on ``direction`` side of ``ref``'s centre (y is up)."""
    if direction == "left":
        return [o for o in objs if o is not ref and o["x"] < ref["x"]]
    if direction == "right":
        return [o for o in objs if o is not ref and o["x"] > ref["x"]]
    if direction == "above":
        return [o for o in objs if o is not ref and o["y"] > ref["y"]]
    return [o for o in objs if o is not ref and o["y"] < ref["y"]]


_DIR_WORDS = {
    "left": ["to the left of", "left of"],
    "right": ["to the right of", "right of"],
    "above": ["above"],
    "below": ["below"],
}

QA = tuple[str, str, str, int]  # question, answer, template, phrasing index


def _choose(rng: random.Random, phrasings: Sequence[str], **fmt: str) -> tuple[str, int]:
    i = rng.randrange(len(phrasings))
    return phrasings[i].format(**fmt), i


def _random_desc(rng: random.Random, attrs: Sequence[str], objs: Sequence[Obj], present: bool):
    if present:
        o = rng.choice(objs)
        return {k: o[k] for k in attrs}
    pools = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    return {k: rng.choice(pools[k]) for k in attrs}


# ----------------------------------------------------------------------------- templates


_COUNT_ATTRS = [
    ("color",),
    ("shape",),
    ("size", "shape"),
    ("color", "shape"),
    ("size", "color", "shape"),
    ("size", "color"),
]


def _q_count(objs: list[Obj], rng: random.Random) -> QA | None:
    attrs = rng.choice(_COUNT_ATTRS)
    desc = _random_desc(rng, attrs, objs, present=rng.random() < 0.85)
    p = _phrase(desc, rng, plural=True)
    q, i = _choose(
        rng,
        [
            "How many {p} are there?",
            "How many {p} are in the image?",
            "What is the number of {p}?",
            "How many {p} can you see?",
        ],
        p=p,
    )
    return q, str(_count(objs, desc)), "count_" + "_".join(attrs), i


_EXISTS_ATTRS = [
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
    ("size", "color"),
]


def _q_exists(objs: list[Obj], rng: random.Random) -> QA | None:
    attrs = rng.choice(_EXISTS_ATTRS)
    want_yes = rng.random() < 0.5
    desc = _random_desc(rng, attrs, objs, present=want_yes)
    for _ in range(30):
        if want_yes or _count(objs, desc) == 0:
            break
        desc = _random_desc(rng, attrs, objs, present=False)
    p = _phrase(desc, rng)
    q, i = _choose(
        rng,
        [
            "Is there {ap}?",
            "Is there {ap} in the image?",
            "Are there any {pp}?",
            "Does the image contain {ap}?",
        ],
        ap=_a(p),
        pp=_phrase(desc, rng, plural=True),
    )
    return q, "yes" if _count(objs, desc) else "no", "exists_" + "_".join(attrs), i


_ATTR_PHRASINGS = {
    "color": ["What color is the {d}?", "What is the color of the {d}?", "Which color is the {d}?"],
    "shape": ["What shape is the {d}?", "What is the shape of the {d}?", "Which shape is the {d}?"],
    "size": ["What size is the {d}?", "Is the {d} small or large?", "How big is the {d}?"],
}


def _q_attribute(objs: list[Obj], rng: random.Random) -> QA | None:
    query = rng.choice(ATTRS)
    others = [a for a in ATTRS if a != query]
    for target in rng.sample(objs, len(objs)):
        descs = _unique_descs(target, objs, others)
        if descs:
            d = _phrase(_pick_desc(rng, descs), rng)
            q, i = _choose(rng, _ATTR_PHRASINGS[query], d=d)
            return q, target[query], f"attribute_{query}", i
    return None


_REL_PHRASINGS = {
    "color": [
        "What color is the shape {w} the {d}?",
        "What is the color of the object {w} the {d}?",
        "There is one shape {w} the {d}. What color is it?",
    ],
    "shape": [
        "What shape is the object {w} the {d}?",
        "What is the shape of the object {w} the {d}?",
        "There is one object {w} the {d}. What shape is it?",
    ],
}


def _relational(
    objs: list[Obj], rng: random.Random, ref_attrs: Sequence[str], require: str | None
) -> tuple[Obj, Desc, str, Obj] | None:
    """(referent, its unique description, direction, the one object on that side)."""
    for ref in rng.sample(objs, len(objs)):
        descs = _unique_descs(ref, objs, ref_attrs, require)
        if not descs:
            continue
        for direction in rng.sample(DIRECTIONS, len(DIRECTIONS)):
            rel = _related(objs, ref, direction)
            if len(rel) == 1:
                return ref, _pick_desc(rng, descs), direction, rel[0]
    return None


def _q_relation(objs: list[Obj], rng: random.Random) -> QA | None:
    found = _relational(objs, rng, ("color", "shape"), None)
    if found is None:
        return None
    _, desc, direction, other = found
    query = rng.choice(("color", "shape"))
    q, i = _choose(
        rng,
        _REL_PHRASINGS[query],
        w=rng.choice(_DIR_WORDS[direction]),
        d=_phrase(desc, rng),
    )
    return q, other[query], f"relation_{direction}_{query}", i


def _q_compare(objs: list[Obj], rng: random.Random) -> QA | None:
    attr = rng.choice(("color", "color", "shape", "shape", "size"))
    pool = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}[attr]
    present = sorted({o[attr] for o in objs}, key=pool.index)
    if attr == "size":
        a, b = rng.sample(SIZES, 2)
    elif len(present) >= 2 and rng.random() < 0.8:
        a, b = rng.sample(present, 2)
    else:
        a = rng.choice(present)
        b = rng.choice([v for v in pool if v != a])
    more = rng.random() < 0.5
    ca, cb = _count(objs, {attr: a}), _count(objs, {attr: b})
    pa, pb = _phrase({attr: a}, rng, plural=True), _phrase({attr: b}, rng, plural=True)
    if more:
        phr = [
            "Are there more {a} than {b}?",
            "Is the number of {a} greater than the number of {b}?",
        ]
        ans = ca > cb
    else:
        phr = ["Are there fewer {a} than {b}?", "Is the number of {a} less than the number of {b}?"]
        ans = ca < cb
    q, i = _choose(rng, phr, a=pa, b=pb)
    return q, "yes" if ans else "no", f"compare_{attr}_{'more' if more else 'fewer'}", i


def _q_multihop(objs: list[Obj], rng: random.Random) -> QA | None:
    kind = rng.choice(("attr", "count", "exists"))
    if kind == "attr":
        found = _relational(objs, rng, ATTRS, "size")
        if found is None:
            return None
        _, desc, direction, other = found
        query = rng.choice(("color", "shape"))
        q, i = _choose(
            rng,
            _REL_PHRASINGS[query],
            w=rng.choice(_DIR_WORDS[direction]),
            d=_phrase(desc, rng),
        )
        return q, other[query], f"multihop_attr_{direction}_{query}", i
    for ref in rng.sample(objs, len(objs)):
        descs = _unique_descs(ref, objs, ATTRS)
        if descs:
            break
    else:
        return None
    d = _phrase(_pick_desc(rng, descs), rng)
    direction = rng.choice(DIRECTIONS)
    w = rng.choice(_DIR_WORDS[direction])
    rel = _related(objs, ref, direction)
    # Optionally filter the counted objects by one attribute (another hop).
    filt: Desc = {}
    if rng.random() < 0.5:
        attr = rng.choice(("color", "shape"))
        src = rng.choice(rel) if rel and rng.random() < 0.7 else rng.choice(objs)
        filt = {attr: src[attr]}
    n = sum(_matches(o, filt) for o in rel)
    if kind == "count":
        p = _phrase(filt, rng, plural=True)
        q, i = _choose(
            rng,
            ["How many {p} are {w} the {d}?", "What is the number of {p} {w} the {d}?"],
            p=p,
            w=w,
            d=d,
        )
        return q, str(n), f"multihop_count_{direction}", i
    p = _phrase(filt, rng)
    q, i = _choose(
        rng,
        ["Is there {ap} {w} the {d}?", "Are there any {pp} {w} the {d}?"],
        ap=_a(p),
        pp=_phrase(filt, rng, plural=True),
        w=w,
        d=d,
    )
    return q, "yes" if n else "no", f"multihop_exists_{direction}", i


def _q_yesno(objs: list[Obj], rng: random.Random) -> QA | None:
    prop = rng.choice(ATTRS)
    others = [a for a in ATTRS if a != prop]
    for target in rng.sample(objs, len(objs)):
        descs = _unique_descs(target, objs, others)
        if not descs:
            continue
        d = _phrase(_pick_desc(rng, descs), rng)
        pool = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}[prop]
        yes = rng.random() < 0.5
        value = target[prop] if yes else rng.choice([v for v in pool if v != target[prop]])
        phr = {
            "shape": ["Is the {d} {av}?", "Is the {d} shaped like {av}?"],
            "color": ["Is the {d} {v}?", "Is the {d} {v} in color?"],
            "size": ["Is the {d} {v}?", "Is the {d} a {v} one?"],
        }[prop]
        q, i = _choose(rng, phr, d=d, v=value, av=_a(value))
        return q, "yes" if yes else "no", f"yesno_{prop}", i
    return None


TEMPLATES: dict[str, Callable[[list[Obj], random.Random], QA | None]] = {
    "count": _q_count,
    "exists": _q_exists,
    "attribute": _q_attribute,
    "relation": _q_relation,
    "compare": _q_compare,
    "multihop": _q_multihop,
    "yesno": _q_yesno,
}


def questions_for_scene(
    scene: dict[str, Any],
    rng: random.Random,
    n: int = 5,
    qtypes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """``n`` distinct questions about ``scene``: ``{question, answer, qtype, template,
    phrasing}`` dicts. ``qtypes`` (cycled) sets the wanted type of each question; when a
    scene cannot support one (e.g. no object is unique), the next type is used."""
    objs = scene["objects"]
    wanted = list(qtypes) if qtypes else [QTYPES[i % len(QTYPES)] for i in range(n)]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for j in range(n):
        want = wanted[j % len(wanted)]
        start = QTYPES.index(want)
        qa = None
        for shift in range(len(QTYPES)):
            qtype = QTYPES[(start + shift) % len(QTYPES)]
            for _ in range(8):
                qa = TEMPLATES[qtype](objs, rng)
                if qa is not None and qa[0] not in seen:
                    break
                qa = None
            if qa is not None:
                break
        if qa is None:
            continue
        question, answer, template, phrasing = qa
        seen.add(question)
        out.append(
            {
                "question": question,
                "answer": answer,
                "qtype": qtype,
                "template": template,
                "phrasing": phrasing,
            }
        )
    return out


# ----------------------------------------------------------------------------- data set


class SynthConfig(BaseModel):
    """Draw synthetic shape scenes with ground-truth scene graphs and templated questions.

    --n counts questions; ceil(n / questions-per-scene) images are drawn. Question types
    (count, exists, attribute, relation, compare, multihop, yesno) are balanced. Re-running
    with the same options does nothing.

    Options of `vpd data synth` (also the ``data:`` section of a recipe).
    """

    out: Path = Field(description="Output folder: images/, train/test.jsonl.")
    n: int = Field(200, ge=1, description="Number of QUESTIONS (train + test).")
    seed: int = Field(0, description="Random seed; same seed -> identical files.")
    test_frac: float = Field(
        0.2, ge=0.0, lt=1.0, description="Fraction of IMAGES held out as test."
    )
    # Validation: this fraction of ALL images, taken from the training images (the test
    # split stays what it is without it), written to val.jsonl: settings are chosen on it.
    val_frac: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of IMAGES held out of training as validation (val.jsonl).",
    )
    size: int = Field(256, ge=96, le=2048, description="Image side, px.")
    questions_per_scene: int = Field(5, ge=1, le=20, description="Questions per image.")
    min_objects: int = Field(3, ge=1, le=10, description="Fewest objects in a scene.")
    max_objects: int = Field(7, ge=1, le=10, description="Most objects in a scene.")
    force: bool = force_field()
    progress: bool = progress_field()

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.test_frac + self.val_frac >= 1:
            raise ValueError("test_frac + val_frac must leave training images (< 1)")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The options that change the output bytes."""
        fp = {
            "generator": "vpd.data.synth/1",
            **self.model_dump(include={"n", "seed", "test_frac", "size", "questions_per_scene"}),
            "objects": [self.min_objects, self.max_objects],
        }
        if self.val_frac:  # a set made without validation keeps its fingerprint
            fp["val_frac"] = self.val_frac
        return fp


def _scene_rng(seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512: stable across runs, machines and PYTHONHASHSEED.
    return random.Random(f"vpd-synth/{seed}/{index}")


def _test_scenes(seed: int, n_scenes: int, test_frac: float) -> set[int]:
    k = round(test_frac * n_scenes)
    if test_frac > 0 and n_scenes >= 2:
        k = min(max(k, 1), n_scenes - 1)  # both splits non-empty
    order = list(range(n_scenes))
    random.Random(f"vpd-synth-split/{seed}").shuffle(order)
    return set(order[:k])


def _val_scenes(seed: int, n_scenes: int, val_frac: float, test: set[int]) -> set[int]:
    """Validation images: drawn from the non-test ones by their own shuffle, so the test
    split is the same with or without a validation split."""
    k = round(val_frac * n_scenes)
    if k == 0:
        return set()
    rest = [i for i in range(n_scenes) if i not in test]
    random.Random(f"vpd-synth-val/{seed}").shuffle(rest)
    return set(rest[: min(k, len(rest) - 1)])


def _write_png(img: Image.Image, path: Path) -> None:
    with atomic_file(path) as tmp:  # never a half-written image after a kill
        img.save(tmp, format="PNG")


@with_config(ConfigDict(extra="forbid"))
class SynthSummary(TypedDict, total=False):
    """What `vpd data synth` returns (and the data stage's marker holds).

    Keys absent on some paths (a skipped run, nothing to do) are missing; an unknown key
    is an error where it is checked (the tests validate summaries against this)."""

    out: str
    questions: int
    train: int
    test: int
    val: int
    images: int
    qtypes: dict[str, int]
    questions_per_s: float
    skipped: bool
    wall_s: float


def run_synth(cfg: SynthConfig) -> SynthSummary:
    """Generate (or, when already complete for the same config, keep) a synthetic set."""
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise VpdError(f"--out must be a directory, got a file: {out}")
    train, test, done = out / "train.jsonl", out / "test.jsonl", out / "synth.done.json"
    val = out / "val.jsonl"
    fp = cfg.fingerprint()
    if train.exists() and not meta_path(train).exists() and not cfg.force:
        raise VpdError(
            f"{train} exists but was not written by `vpd data synth`; use another --out or --force"
        )
    if train.exists() and not meta_path(train).exists():  # --force on a foreign file
        set_aside(train)
    old = read_meta(train) if train.exists() else None
    ensure_meta(train, fp, force=cfg.force)  # raises on a config change unless force

    if (
        old == json.loads(json.dumps(fp))
        and done.exists()
        and train.exists()
        and test.exists()
        and (val.exists() or not cfg.val_frac)
        and json.loads(done.read_text(encoding="utf-8")).get("config") == old
    ):
        summary = json.loads(done.read_text(encoding="utf-8"))["summary"]
        return {**summary, "skipped": True, "wall_s": round(time.time() - t0, 3)}
    done.unlink(missing_ok=True)
    summary = generate(
        out,
        cfg.n,
        cfg.seed,
        test_frac=cfg.test_frac,
        val_frac=cfg.val_frac,
        size=cfg.size,
        questions_per_scene=cfg.questions_per_scene,
        min_objects=cfg.min_objects,
        max_objects=cfg.max_objects,
        progress=cfg.progress,
    )
    atomic_write_json(done, {"config": fp, "summary": summary}, indent=2)
    return {**summary, "skipped": False, "wall_s": round(time.time() - t0, 3)}


def generate(
    out_dir: Path | str,
    n: int,
    seed: int = 0,
    *,
    test_frac: float = 0.2,
    val_frac: float = 0.0,
    size: int = 256,
    questions_per_scene: int = 5,
    min_objects: int = 3,
    max_objects: int = 7,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``n`` questions over ``ceil(n / questions_per_scene)`` scenes into ``out_dir``.

    Always (re)writes; :func:`run_synth` adds the resume check and the meta file.
    Returns ``{"questions", "train", "test", "images", "qtypes", "out"}`` (and ``"val"``
    with ``val_frac``).
    """
    if n < 1:
        raise VpdError("--n must be >= 1")
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    n_scenes = math.ceil(n / questions_per_scene)
    test_ids = _test_scenes(seed, n_scenes, test_frac)
    val_ids = _val_scenes(seed, n_scenes, val_frac, test_ids)
    splits = ("train", "test", "val") if val_ids else ("train", "test")
    counts = dict.fromkeys(splits, 0)
    per_type = dict.fromkeys(QTYPES, 0)
    made = 0
    t0 = time.time()
    # Each split is written beside its file and renamed into place once all are complete.
    with contextlib.ExitStack() as stack:
        tmps = {s: stack.enter_context(atomic_file(out / f"{s}.jsonl")) for s in splits}
        files = {s: stack.enter_context(open(tmps[s], "w", encoding="utf-8")) for s in splits}
        with progress_bar("synth scenes", n_scenes, "scene", enabled=progress) as bar:
            for s in range(n_scenes):
                rng = _scene_rng(seed, s)
                scene, img = scene_and_image(rng, size, min_objects, max_objects)
                name = f"images/s{s:06d}.png"
                _write_png(img, out / name)
                want = min(questions_per_scene, n - made)
                g0 = s * questions_per_scene  # global index: qtypes rotate over the set
                qtypes = [QTYPES[(g0 + j) % len(QTYPES)] for j in range(want)]
                split = "test" if s in test_ids else "val" if s in val_ids else "train"
                for j, qa in enumerate(questions_for_scene(scene, rng, want, qtypes)):
                    rec = Question(
                        id=f"synth{seed}-s{s:06d}-q{j}",
                        image=name,
                        question=qa["question"],
                        answers=[qa["answer"]],
                        dataset="synth",
                        split=split,
                        meta={
                            "qtype": qa["qtype"],
                            "template": qa["template"],
                            "phrasing": qa["phrasing"],
                            "scene_id": f"s{s:06d}",
                            "scene": scene,
                        },
                    )
                    files[split].write(rec.model_dump_json() + "\n")
                    counts[split] += 1
                    per_type[qa["qtype"]] += 1
                made += want
                bar.advance()
    wall = time.time() - t0
    total = sum(counts.values())
    return {
        "out": str(out),
        "questions": total,
        **counts,
        "images": n_scenes,
        "qtypes": per_type,
        "questions_per_s": round(total / max(wall, 1e-9), 1),
    }


def summary_line(cfg: SynthConfig, s: dict[str, Any]) -> str:
    """What `vpd data synth` prints when it is done."""
    state = "already complete, kept" if s["skipped"] else f"written in {s['wall_s']}s"
    val = f" / {s['val']} val" if s.get("val") else ""
    return (
        f"synth {cfg.out}: {s['questions']} questions ({s['train']} train{val} / "
        f"{s['test']} test) on {s['images']} images; {state}"
    )
