"""Accuracy of the synthetic classical-CV backend on scenes it has never seen the truth of.

Two styles: `vpd data synth` scenes (flat colours, no anti-aliasing, grey background) and
scenes drawn here with OpenCV (anti-aliased, rotated, other backgrounds, non-square images,
noise, extra shapes and white/gray/black objects). The backend only gets the pixels.
Run with -s to see the accuracy numbers.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import cv2
import numpy as np
import pytest

from vpd.data.synth import scene_and_image
from vpd.tools.backends import get_backend
from vpd.tools.backends.base import ImageData
from vpd.tools.backends.synthetic import color_name, objects_in, parse_description

DRAW_COLORS = {
    "red": (220, 30, 40),
    "orange": (245, 150, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (130, 50, 180),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
BACKGROUNDS = [(255, 255, 255), (35, 35, 45), (205, 225, 245), (190, 190, 170)]
DRAW_SHAPES = ("circle", "square", "rectangle", "triangle", "star", "hexagon")


def _poly(shape, cx, cy, R, rot):
    if shape == "square":
        angs, rads = [rot + k * 90 + 45 for k in range(4)], [R] * 4
    elif shape == "rectangle":
        a = math.degrees(math.atan2(1, 2))
        angs = [rot + a, rot + 180 - a, rot + 180 + a, rot - a]
        rads = [R] * 4
    elif shape == "triangle":
        angs, rads = [rot + 90 + k * 120 for k in range(3)], [R] * 3
    elif shape == "hexagon":
        angs, rads = [rot + k * 60 for k in range(6)], [R] * 6
    elif shape == "star":
        angs = [rot + 90 + k * 36 for k in range(10)]
        rads = [R if k % 2 == 0 else R * 0.42 for k in range(10)]
    pts = [
        (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
        for a, r in zip(angs, rads, strict=True)
    ]
    return np.array(pts)


def draw_scene(rng: random.Random, width: int, height: int, n: int, noise: float = 0.0):
    bg = rng.choice(BACKGROUNDS)
    dark = sum(bg) < 300
    img = np.full((height, width, 3), bg, np.uint8)
    side = min(width, height)
    objs = []
    tries = 0
    while len(objs) < n and tries < 2000:
        tries += 1
        size = rng.choice(["small", "large"])
        R = side * (rng.uniform(0.045, 0.06) if size == "small" else rng.uniform(0.11, 0.14))
        cx, cy = rng.uniform(R + 3, width - R - 3), rng.uniform(R + 3, height - R - 3)
        if any(math.hypot(cx - o["cx"], cy - o["cy"]) < R + o["R"] + 6 for o in objs):
            continue
        colors = [
            c
            for c in DRAW_COLORS
            if not (dark and c == "black") and not (bg == (255, 255, 255) and c == "white")
        ]
        color = rng.choice(colors)
        shape = rng.choice(DRAW_SHAPES)
        objs.append(
            {
                "cx": cx,
                "cy": cy,
                "R": R,
                "size": size,
                "color": color,
                "shape": shape,
                "rot": rng.uniform(0, 360),
            }
        )
    for o in objs:
        col = DRAW_COLORS[o["color"]]
        if o["shape"] == "circle":
            cv2.circle(
                img,
                (round(o["cx"] * 16), round(o["cy"] * 16)),
                round(o["R"] * 16),
                col,
                -1,
                cv2.LINE_AA,
                shift=4,
            )
        else:
            pts = np.round(_poly(o["shape"], o["cx"], o["cy"], o["R"], o["rot"]) * 16).astype(
                np.int32
            )
            cv2.fillPoly(img, [pts], col, cv2.LINE_AA, shift=4)
    if noise:
        nrng = np.random.default_rng(rng.randrange(1 << 30))
        img = np.clip(img + nrng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    return img, objs


def _score(truth: list[dict], det: list, center: tuple) -> Counter:
    """Per-object correctness: (matched, color, shape, size) counts."""
    c: Counter = Counter()
    for o in truth:
        c["objects"] += 1
        x, y = center(o)
        m = [d for d in det if math.hypot(d.cx - x, d.cy - y) < o["_radius"]]
        if len(m) != 1:
            continue
        c["matched"] += 1
        ok = all(m[0].attr(k) == o[k] for k in ("color", "shape", "size"))
        c["all_attrs"] += ok
        for k in ("color", "shape", "size"):
            c[k] += m[0].attr(k) == o[k]
    return c


def _report(name: str, c: Counter, scenes: int, count_ok: int) -> None:
    n = c["objects"]
    parts = ", ".join(f"{k} {c[k] / n:.1%}" for k in ("matched", "color", "shape", "size"))
    print(
        f"\n{name}: {n} objects in {scenes} scenes: {parts}; object-level (all three) "
        f"{c['all_attrs'] / n:.1%}; scene object counts exact {count_ok / scenes:.1%}"
    )


@pytest.mark.parametrize("size", [96, 256, 384])
def test_accuracy_on_synth_scenes(size: int) -> None:
    rng = random.Random(size)
    total: Counter = Counter()
    count_ok = 0
    scenes = 60
    for _ in range(scenes):
        scene, img = scene_and_image(rng, size)
        det = objects_in(ImageData.from_array(np.asarray(img)), None)
        count_ok += len(det) == len(scene["objects"])
        for o in scene["objects"]:
            o["_radius"] = o["r"]
        total += _score(scene["objects"], det, lambda o: (o["x"], o["y"]))
        # The tight boxes are exactly synth's (same pixel convention).
        assert sorted(d.box for d in det) == sorted(tuple(o["box"]) for o in scene["objects"])
    _report(f"synth {size}px", total, scenes, count_ok)
    assert count_ok == scenes
    assert total["all_attrs"] / total["objects"] >= 0.98


def test_accuracy_on_drawn_scenes() -> None:
    rng = random.Random(0)
    total: Counter = Counter()
    count_ok = 0
    scenes = 120
    for i in range(scenes):
        w, h = [(200, 200), (300, 300), (480, 360), (320, 480)][i % 4]
        img, objs = draw_scene(rng, w, h, rng.randint(3, 7), noise=3.0 if i % 3 == 0 else 0.0)
        det = objects_in(ImageData.from_array(img), None)
        count_ok += len(det) == len(objs)
        for o in objs:
            o["_radius"] = o["R"]
        total += _score(objs, det, lambda o, h=h: (o["cx"], h - o["cy"]))
    _report("drawn (anti-aliased, rotated, 4 backgrounds)", total, scenes, count_ok)
    assert count_ok / scenes >= 0.98
    assert total["all_attrs"] / total["objects"] >= 0.95
    for k in ("color", "shape", "size"):
        assert total[k] / total["objects"] >= 0.95, k


def test_color_names() -> None:
    cases = {
        (255, 0, 0): "red",
        (255, 128, 0): "orange",
        (255, 255, 0): "yellow",
        (0, 200, 0): "green",
        (0, 0, 255): "blue",
        (160, 0, 255): "purple",
        (128, 0, 128): "purple",
        (250, 250, 250): "white",
        (120, 120, 120): "gray",
        (10, 10, 10): "black",
        (200, 30, 60): "red",
    }
    for rgb, name in cases.items():
        assert color_name(rgb) == name, rgb


def test_parse_description() -> None:
    assert parse_description("large red circles") == {
        "size": {"large"},
        "color": {"red"},
        "shape": {"circle"},
    }
    assert parse_description("the big object") == {"size": {"large"}}
    assert parse_description("tiny things") == {"size": {"small"}}
    assert parse_description("shape") == {}
    assert parse_description("dog") is None  # unknown to the detector: nothing is found
    assert parse_description("red or blue shapes") == {"color": {"red", "blue"}}


def _one_scene() -> ImageData:
    """White background: large red circle left, small blue square right, large green
    triangle top middle (drawn here, anti-aliased)."""
    img = np.full((200, 300, 3), 255, np.uint8)
    cv2.circle(img, (60, 120), 35, (220, 30, 40), -1, cv2.LINE_AA)
    cv2.rectangle(img, (220, 130), (240, 150), (30, 80, 220), -1, cv2.LINE_AA)
    tri = np.array([[150, 10], [185, 70], [115, 70]], np.int32)
    cv2.fillPoly(img, [tri], (40, 170, 60), cv2.LINE_AA)
    return ImageData.from_array(img)


def test_backend_ops_on_a_drawn_scene() -> None:
    b = get_backend("synthetic")
    im = _one_scene()
    assert len(b.detect(im, None, "shape")) == 3
    assert len(b.detect(im, None, "objects")) == 3
    (circle,) = b.detect(im, None, "red circle")
    assert circle[0] < 60 < circle[2] and circle[1] < 200 - 120 < circle[3]  # y is up
    assert b.detect(im, None, "large shapes") == sorted(
        b.detect(im, None, "circle") + b.detect(im, None, "triangle")
    )
    assert b.detect(im, None, "big things") == b.detect(im, None, "large shapes")
    assert len(b.detect(im, None, "tiny square")) == 1
    assert b.detect(im, None, "dog") == []
    assert b.detect(im, (0, 0, 150, 200), "shape") == [circle]  # left half only
    assert b.verify_property(im, None, "circle", "red")
    assert not b.verify_property(im, None, "circle", "blue")
    assert b.verify_property(im, None, "square", "small")
    assert b.best_text_match(im, circle, ["blue square", "red circle", "green"]) == "red circle"
    ans = b.answer
    assert ans(im, None, "How many large shapes are there?") == "2"
    assert ans(im, None, "What color is the triangle?") == "green"
    assert ans(im, None, "What shape is the blue object?") == "square"
    assert ans(im, None, "Is the square small or large?") == "small"
    assert ans(im, None, "Is there a purple star?") == "no"
    assert ans(im, None, "Are there any red circles?") == "yes"
    assert ans(im, None, "Is the red shape a circle?") == "yes"
    assert ans(im, None, "Is the triangle blue?") == "no"
    assert ans(im, None, "What color is the shape to the left of the triangle?") == "red"
    assert ans(im, None, "How many shapes are below the green triangle?") == "2"
    assert ans(im, circle, "What color is this?") == "red"  # the patch's own object
    assert ans(im, (0, 0, 10, 10), "What is this?") == "nothing"
    # Depth from apparent size: the large circle is closer than the small square.
    (square,) = b.detect(im, None, "square")
    assert b.depth(im, circle) < b.depth(im, square) < b.depth(im, (0, 0, 10, 10)) == 1.0
    assert b.match_score(im, circle, "red circle") > b.match_score(im, square, "red circle")


def test_llm_query_needs_an_llm() -> None:
    from vpd.tools.backends.base import ToolError

    with pytest.raises(ToolError, match="llm_query needs an LLM"):
        get_backend("synthetic").llm_query("What is the capital of France?")


def test_llm_query_uses_the_given_llm() -> None:
    from vpd.llm.base import Completion

    class EchoLLM:  # a fake LLM (tests only): records what it was asked
        name = "echo"

        def __init__(self) -> None:
            self.asked: list = []

        def generate(self, batch, params):
            self.asked.append((batch, params))
            return [[Completion(text=" Paris ")] for _ in batch]

        def close(self) -> None:
            pass

    llm = EchoLLM()
    b = get_backend("synthetic", llm=llm)
    assert b.llm_query("capital of France?", False) == "Paris"
    ((batch, params),) = llm.asked
    assert batch[0][-1]["content"] == "capital of France?" and params.max_tokens <= 32


def test_unknown_backend_is_a_user_error() -> None:
    from vpd.errors import VpdError

    with pytest.raises(VpdError, match="unknown tool backend"):
        get_backend("nope")
