"""The client ImagePatch API, the ToolServer (cache, batching, errors, trace summaries)
and VisProg parsing/evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from vpd.records import ToolCall
from vpd.tools.api import (
    ImagePatch,
    bool_to_yesno,
    coerce_to_numeric,
    distance,
    make_image_handle,
)
from vpd.tools.backends import get_backend
from vpd.tools.backends.base import Backend
from vpd.tools.namespace import build_namespace, run_inprocess
from vpd.tools.protocol import ToolRequest
from vpd.tools.server import ToolServer
from vpd.tools.visprog import check_visprog, run_visprog, safe_eval


class FakeCaller:
    """Records calls; answers size and crop like the server, find from a table (tests only)."""

    def __init__(self, w: int = 200, h: int = 100, found: list | None = None) -> None:
        self.w, self.h = w, h
        self.found = found or []
        self.calls: list[tuple[str, Any, dict]] = []

    def __call__(self, op: str, box: Any, args: dict) -> Any:
        json.dumps([op, box, args])  # the wire carries JSON only
        self.calls.append((op, box, args))
        if op == "size":
            return [self.w, self.h]
        if op == "crop":
            left, lower = (box or [0, 0])[:2]
            return [
                left + args["left"],
                lower + args["lower"],
                left + args["right"],
                lower + args["upper"],
            ]
        if op == "find":
            return self.found
        return True


def test_root_patch_geometry_is_lazy() -> None:
    c = FakeCaller()
    image = make_image_handle(c)
    p = ImagePatch(image)
    assert c.calls == []  # no size asked until geometry is used
    assert (p.left, p.lower, p.right, p.upper) == (0, 0, 200, 100)
    assert (p.width, p.height, p.horizontal_center, p.vertical_center) == (200, 100, 100, 50)
    assert [op for op, _, _ in c.calls] == ["size"]  # asked once, shared
    assert ImagePatch(image).width == 200
    assert [op for op, _, _ in c.calls] == ["size"]


def test_crop_is_relative_and_traced() -> None:
    c = FakeCaller()
    p = ImagePatch(make_image_handle(c))
    q = p.crop(10, 20, 60, 80.7)
    assert (q.left, q.lower, q.right, q.upper) == (10, 20, 60, 80)
    r = q.crop(5, 5, 15, 15)  # relative to q
    assert (r.left, r.lower, r.right, r.upper) == (15, 25, 25, 35)
    assert ImagePatch(q, 5, 5, 15, 15) == r
    assert c.calls[-1][0] == "crop" and c.calls[-1][1] == [10, 20, 60, 80]
    with pytest.raises(TypeError):
        p.crop("a", 0, 1, 1)
    with pytest.raises(TypeError):
        ImagePatch(q, 1, 2)
    with pytest.raises(TypeError):
        ImagePatch("not an image")


def test_find_and_ops_send_plain_data() -> None:
    c = FakeCaller(found=[[1, 2, 11, 12], [50, 50, 70, 90]])
    p = ImagePatch(make_image_handle(c))
    a, b = p.find("red circle")
    assert (a.left, a.lower, a.right, a.upper) == (1, 2, 11, 12)
    assert a.find("x") and c.calls[-1] == ("find", [1, 2, 11, 12], {"name": "x"})
    assert p.exists("dog") is True
    assert p.verify_property("circle", "red") is True
    p.simple_query()
    assert c.calls[-1] == ("simple_query", None, {"question": "What is this?"})
    assert a.overlaps_with(10, 10, 20, 20) and not a.overlaps_with(12, 0, 20, 20)
    assert distance(a, b) == pytest.approx(((50 - 11) ** 2 + (50 - 12) ** 2) ** 0.5)
    assert distance(a, a) == -1.0  # overlapping: -IoU
    assert distance(3, 5.5) == 2.5
    assert a != b and a == p.find("red circle")[0]


def test_namespace_names() -> None:
    ns = build_namespace(FakeCaller())
    public = {k for k in ns if not k.startswith("_")}
    assert public == {
        "ImagePatch",
        "best_image_match",
        "distance",
        "bool_to_yesno",
        "coerce_to_numeric",
        "llm_query",
        "math",
    }
    assert callable(ns["_root_patch"]) and callable(ns["_run_visprog"])
    assert isinstance(ns["_root_patch"](), ns["ImagePatch"])


def test_programs_using_the_api_pass_the_static_check() -> None:
    from vpd.execute.static import check_program

    prog = (
        "def execute_command(image):\n"
        "    p = ImagePatch(image)\n"
        "    xs = sorted(p.find('shape'), key=lambda s: s.horizontal_center)\n"
        "    return bool_to_yesno(len(xs) > 0 and xs[0].verify_property('shape', 'red'))\n"
    )
    assert check_program(prog).ok
    # The caller lives in underscore attributes, which programs cannot reach.
    assert not check_program("def execute_command(image):\n    return image._ref\n").ok


def test_helpers() -> None:
    assert bool_to_yesno(True) == "yes" and bool_to_yesno(0) == "no"
    assert coerce_to_numeric("3 apples") == 3
    assert coerce_to_numeric("three") == 3
    assert coerce_to_numeric("1,200.5 m") == 1200.5
    assert coerce_to_numeric(4.0) == 4.0
    assert coerce_to_numeric("none") == "none"
    with pytest.raises(ValueError):
        coerce_to_numeric("none", no_string=True)


# ----------------------------------------------------------------------------- server


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    """200x100 white image: red circle on the left, small blue square on the right."""
    img = np.full((100, 200, 3), 255, np.uint8)
    cv2.circle(img, (40, 50), 25, (0, 0, 220), -1, cv2.LINE_AA)  # BGR red
    cv2.rectangle(img, (150, 40), (165, 55), (220, 60, 20), -1)  # BGR blue
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), img)
    return path


def test_server_answers_and_traces_normalized(scene: Path) -> None:
    server = ToolServer(get_backend("synthetic"))
    img = str(scene)
    resp = server.call(ToolRequest("find", img, None, {"name": "shape"}))
    assert resp.ok and len(resp.result) == 2
    circle = resp.result[0]
    assert circle[0] < 40 < circle[2] and circle[1] < 50 < circle[3]
    tc = server.summarize(ToolRequest("find", img, None, {"name": "shape"}), resp.result)
    assert isinstance(tc, ToolCall) and tc.name == "find"
    assert tc.args == {"name": "shape", "patch": [0.0, 0.0, 1.0, 1.0]}
    boxes = json.loads(tc.result)
    assert all(0 <= v <= 1 and round(v, 2) == v for b in boxes for v in b)
    req = ToolRequest("simple_query", img, tuple(circle), {"question": "What color is this?"})
    assert server.call(req).result == "red"
    tc = server.summarize(req, "red")
    assert tc.result == '"red"' and tc.args["patch"] == [
        round(v / d, 2) for v, d in zip(circle, (200, 100, 200, 100), strict=True)
    ]
    crop = ToolRequest("crop", img, None, {"left": 100, "lower": 0, "right": 300, "upper": 50})
    assert server.call(crop).result == [100, 0, 200, 50]  # clipped to the image
    tc = server.summarize(crop, [100, 0, 200, 50])
    assert json.loads(tc.result) == [0.5, 0.0, 1.0, 0.5] and "left" not in tc.args


def test_server_truncates_long_lists(tmp_path: Path) -> None:
    img = np.full((100, 400, 3), 30, np.uint8)
    for i in range(12):
        cv2.circle(img, (16 + 32 * i, 50), 10, (0, 200, 0), -1)
    path = tmp_path / "many.png"
    cv2.imwrite(str(path), img)
    server = ToolServer(get_backend("synthetic"))
    req = ToolRequest("find", str(path), None, {"name": "green circles"})
    res = server.call(req).result
    assert len(res) == 12
    shown = json.loads(server.summarize(req, res).result)
    assert len(shown) == 9 and shown[-1] == "+4 more"


def test_server_cache_hits_and_batches(scene: Path) -> None:
    class Counting(Backend):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[int] = []

        def detect_batch(self, items):  # one call per batch: what a model backend does
            self.batches.append(len(items))
            return [[[0, 0, 1, 1]] for _ in items]

    backend = Counting()
    server = ToolServer(backend, cache_size=2)
    img = str(scene)
    reqs = [ToolRequest("find", img, None, {"name": n}) for n in ("a", "b", "a", "c")]
    reqs.append(ToolRequest("exists", img, None, {"name": "a"}))
    out = server.call_batch(reqs)
    assert [r.ok for r in out] == [True] * 5 and out[4].result is True
    # finds grouped into one batch (3 distinct), exists in another
    assert backend.batches == [3, 1]
    assert server.cache_stats()["hits"] == 1 and server.cache_stats()["misses"] == 4
    server.call(ToolRequest("exists", img, None, {"name": "a"}))
    assert server.cache_stats()["hits"] == 2  # shared across calls/programs
    assert server.cache_stats()["size"] == 2  # LRU bound


def test_server_errors_are_responses(scene: Path, tmp_path: Path) -> None:
    server = ToolServer(get_backend("synthetic"))
    img = str(scene)
    bad = [
        (ToolRequest("nope", img, None, {}), "unknown tool op"),
        (ToolRequest("find", img, None, {}), "needs argument 'name'"),
        (ToolRequest("find", img, None, {"name": 3}), "must be str"),
        (ToolRequest("find", img, None, {"name": "x", "extra": 1}), "unexpected"),
        (ToolRequest("find", str(tmp_path / "missing.png"), None, {"name": "x"}), "cannot read"),
        (ToolRequest("llm_query", img, None, {"question": "q"}), "needs an LLM"),
        (ToolRequest("best_text_match", img, None, {"options": []}), "non-empty list"),
    ]
    for req, why in bad:
        resp = server.call(req)
        assert not resp.ok and why in resp.error, (req, resp)

    class Broken(Backend):
        def answer(self, image, box, question):
            raise KeyError("boom")

    resp = ToolServer(Broken()).call(ToolRequest("simple_query", img, None, {"question": "q"}))
    assert not resp.ok and "KeyError" in resp.error


def test_run_inprocess_round_trip(scene: Path) -> None:
    server = ToolServer(get_backend("synthetic"))
    prog = (
        "def execute_command(image):\n"
        "    image_patch = ImagePatch(image)\n"
        "    shapes = image_patch.find('shape')\n"
        "    left = image_patch.crop(0, 0, image_patch.width // 2, image_patch.height)\n"
        "    best = best_image_match(shapes, ['blue square'])\n"
        "    return [len(left.find('shape')), best.simple_query('What shape is this?'),\n"
        "            shapes[0].compute_depth() < shapes[1].compute_depth()]\n"
    )
    answer, trace = run_inprocess(prog, scene, server)
    assert answer == "1, square, yes"
    names = [t.name for t in trace]
    assert (
        names
        == ["find", "size", "crop", "best_image_match", "find", "simple_query"]
        + ["compute_depth"] * 2
    )
    with pytest.raises(RuntimeError, match="llm_query needs an LLM"):
        run_inprocess("def execute_command(image):\n    return llm_query('hi')\n", scene, server)


# ----------------------------------------------------------------------------- VisProg


def test_visprog_syntax_errors() -> None:
    ok = "BOX0=LOC(image=IMAGE,object='dog')\nFINAL_RESULT=RESULT(var=BOX0)"
    assert check_visprog(ok) is None
    cases = {
        "": "empty",
        "BOX0=LOC(image=IMAGE,object='dog')": "must end with FINAL_RESULT",
        "X=FOO(a='1')\nF=RESULT(var=X)": "unknown module 'FOO'",
        "B=LOC(image=IMG,object='x')\nF=RESULT(var=B)": "IMG is used before",
        "B=LOC(image=IMAGE)\nF=RESULT(var=B)": "needs argument(s) object",
        "B=LOC(image=IMAGE,object=x)\nF=RESULT(var=B)": "quoted string",
        "B=LOC(image=IMAGE,object='x'\nF=RESULT(var=B)": "line 1: not a step",
        "A=EVAL(expr=\"__import__('os')\")\nF=RESULT(var=A)": "not allowed",
        'A=EVAL(expr="(1).real")\nF=RESULT(var=A)': "line 1",
        'A=EVAL(expr="{Q} + 1")\nF=RESULT(var=A)': "Q is used before",
    }
    for text, why in cases.items():
        err = check_visprog(text)
        assert err is not None and why in err, (text, err)


def test_safe_eval() -> None:
    assert safe_eval("'yes' if 3 > 0 and not False else 'no'") == "yes"
    assert safe_eval("1 < 2 < 3") is True and safe_eval("3 < 2 < 5") is False
    assert safe_eval("(2 + 3) * 4 // 3 - -1") == 7
    assert safe_eval("True xor False") is True
    assert safe_eval("'a' == 'a' or 1 / 0") is True
    for bad in ("x", "f(1)", "[1]", "'a' * 9", "1 if 2", "1 +"):
        with pytest.raises(ValueError):
            safe_eval(bad)


def test_visprog_runs_on_the_api() -> None:
    c = FakeCaller(found=[[10, 10, 20, 20], [150, 60, 170, 80]])
    prog = (
        "BOX0=LOC(image=IMAGE,object='ball')\n"
        "IMAGE0=CROP_RIGHTOF(image=IMAGE,box=BOX0)\n"
        "ANSWER0=COUNT(box=BOX0)\n"
        "ANSWER1=VQA(image=IMAGE0,question='What is this?')\n"
        "ANSWER2=EVAL(expr=\"'yes' if {ANSWER0} == 2 and {ANSWER1} else 'no'\")\n"
        "FINAL_RESULT=RESULT(var=ANSWER2)"
    )
    assert run_visprog(prog, build_namespace(c)) == "yes"
    crops = [(box, args) for op, box, args in c.calls if op == "crop"]
    # right of the first box's centre (x = 15), excluding the centre column
    assert crops == [(None, {"left": 16, "lower": 0, "right": 200, "upper": 100})]
    with pytest.raises(ValueError, match="must be the output of LOC"):
        run_visprog("A=COUNT(box=IMAGE)\nF=RESULT(var=A)", build_namespace(c))
