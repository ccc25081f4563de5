"""vpd.data.synth: determinism, answers re-derived independently, pixels, splits, CLI."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import main_vpd, run_vpd
from vpd.cli import app
from vpd.data import synth
from vpd.data.synth import SynthConfig, generate, run_synth

# The test's own vocabulary: deliberately NOT imported from the module under test.
SIZES = {"small", "large"}
COLORS = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "purple": (160, 0, 255),
}
SHAPES = {"circle", "square", "triangle", "star"}
NOUNS = {"shape", "shapes", "object", "objects"}
QTYPES = {"count", "exists", "attribute", "relation", "compare", "multihop", "yesno"}
DIR_WORDS = "to the left of|left of|to the right of|right of|above|below"
DIR = rf"(?P<w>{DIR_WORDS})"


def _files_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith((".meta.json", ".done.json"))
    }


# ----------------------------------------------------------------------------- oracle


def parse_np(text: str) -> dict[str, str]:
    """'large blue squares' -> {'size': 'large', 'color': 'blue', 'shape': 'square'}."""
    words = text.split()
    noun = words[-1]
    desc: dict[str, str] = {}
    if noun.rstrip("s") in SHAPES:
        desc["shape"] = noun.rstrip("s")
    else:
        assert noun in NOUNS, text
    for w in words[:-1]:
        key = "size" if w in SIZES else "color" if w in COLORS else None
        assert key is not None and key not in desc, text
        desc[key] = w
    return desc


def centre(o: dict) -> tuple[float, float]:
    left, lower, right, upper = o["box"]
    return (left + right) / 2, (lower + upper) / 2


def matching(objs: list[dict], desc: dict[str, str]) -> list[dict]:
    return [o for o in objs if all(o[k] == v for k, v in desc.items())]


def the(objs: list[dict], text: str) -> dict:
    """The one object 'the <text>' refers to; the generator promised it is unique."""
    found = matching(objs, parse_np(text))
    assert len(found) == 1, f"'the {text}' matches {len(found)} objects"
    return found[0]


def side(objs: list[dict], ref: dict, w: str) -> list[dict]:
    rx, ry = centre(ref)
    test = {
        "left": lambda x, y: x < rx,
        "right": lambda x, y: x > rx,
        "above": lambda x, y: y > ry,
        "below": lambda x, y: y < ry,
    }[w.split()[-2] if w.endswith(" of") else w]
    return [o for o in objs if o is not ref and test(*centre(o))]


def yn(b: bool) -> str:
    return "yes" if b else "no"


def oracle(question: str, objs: list[dict]) -> str:
    """Answer a generated question from the scene graph alone, by parsing its text."""
    q = question
    m = re.fullmatch(
        rf"(?:How many (?P<p>.+?) are|What is the number of (?P<p2>.+?)) {DIR} the (?P<d>.+)\?", q
    )
    if m:
        rel = side(objs, the(objs, m["d"]), m["w"])
        return str(len(matching(rel, parse_np(m["p"] or m["p2"]))))
    m = re.fullmatch(
        r"How many (?P<p>.+?) (?:are there|are in the image|can you see)\?"
        r"|What is the number of (?P<p2>.+)\?",
        q,
    )
    if m:
        return str(len(matching(objs, parse_np(m["p"] or m["p2"]))))
    m = re.fullmatch(
        rf"(?:Is there an? (?P<p>.+?)|Are there any (?P<p2>.+?)) {DIR} the (?P<d>.+)\?", q
    )
    if m:
        rel = side(objs, the(objs, m["d"]), m["w"])
        return yn(bool(matching(rel, parse_np(m["p"] or m["p2"]))))
    m = re.fullmatch(
        r"(?:Is there an? (?P<a>.+?)(?: in the image)?|Are there any (?P<b>.+?)"
        r"|Does the image contain an? (?P<c>.+?))\?",
        q,
    )
    if m:
        return yn(bool(matching(objs, parse_np(m["a"] or m["b"] or m["c"]))))
    m = re.fullmatch(
        rf"(?:What (?P<k1>color|shape) is the (?:shape|object) {DIR} the (?P<d>.+)\?"
        rf"|What is the (?P<k2>color|shape) of the object (?P<w2>{DIR_WORDS}) the (?P<d2>.+)\?"
        rf"|There is one (?:shape|object) (?P<w3>{DIR_WORDS}) the (?P<d3>.+)\. "
        r"What (?P<k3>color|shape)"
        r" is it\?)",
        q,
    )
    if m and (m["w"] or m["w2"] or m["w3"]):
        rel = side(objs, the(objs, m["d"] or m["d2"] or m["d3"]), m["w"] or m["w2"] or m["w3"])
        assert len(rel) == 1, f"{q}: {len(rel)} objects on that side"
        return rel[0][m["k1"] or m["k2"] or m["k3"]]
    m = re.fullmatch(
        r"(?:What (?P<k>color|shape|size) is the (?P<d>.+)|What is the (?P<k2>color|shape)"
        r" of the (?P<d2>.+)|Which (?P<k3>color|shape) is the (?P<d3>.+)"
        r"|Is the (?P<d4>.+) small or large|How big is the (?P<d5>.+))\?",
        q,
    )
    if m:
        key = m["k"] or m["k2"] or m["k3"] or "size"
        return the(objs, m["d"] or m["d2"] or m["d3"] or m["d4"] or m["d5"])[key]
    m = re.fullmatch(
        r"(?:Are there (?P<c1>more|fewer) (?P<a>.+) than (?P<b>.+)"
        r"|Is the number of (?P<a2>.+) (?P<c2>greater|less) than the number of (?P<b2>.+))\?",
        q,
    )
    if m:
        na = len(matching(objs, parse_np(m["a"] or m["a2"])))
        nb = len(matching(objs, parse_np(m["b"] or m["b2"])))
        more = (m["c1"] or m["c2"]) in ("more", "greater")
        return yn(na > nb if more else na < nb)
    m = re.fullmatch(
        r"Is the (?P<d>.+?) (?:shaped like an? |an? )?(?P<v>\w+)(?: in color| one)?\?", q
    )
    assert m, f"no oracle pattern for {q!r}"
    obj = the(objs, m["d"])
    v = m["v"]
    key = "shape" if v in SHAPES else "color" if v in COLORS else "size"
    assert v in SHAPES | set(COLORS) | SIZES, q
    return yn(obj[key] == v)


# ----------------------------------------------------------------------------- tests


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(tmp_path / name, n=60, seed=seed)
    a, b, c = (_files_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    assert a["images/s000000.png"] != c["images/s000000.png"]


def test_scene_i_does_not_depend_on_n(tmp_path: Path) -> None:
    # Growing a set keeps its first images: useful to extend a set without reshuffling it.
    generate(tmp_path / "small", n=20, seed=1, test_frac=0.0)
    generate(tmp_path / "big", n=50, seed=1, test_frac=0.0)
    for i in range(4):
        name = f"images/s{i:06d}.png"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()


def test_answers_match_independent_oracle_over_200_scenes(tmp_path: Path) -> None:
    summary = generate(tmp_path, n=1000, seed=11)
    assert summary["images"] == 200 and summary["questions"] == 1000
    n = 0
    for split in ("train", "test"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            objs = r["meta"]["scene"]["objects"]
            assert r["answers"] == [oracle(r["question"], objs)], r["question"]
            assert r["split"] == split and r["dataset"] == "synth"
            n += 1
    assert n == 1000


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([128, 256, 320]))
def test_questions_correct_for_any_seed(seed: int, size: int) -> None:
    rng = random.Random(seed)
    scene, _ = synth.scene_and_image(rng, size)
    qs = synth.questions_for_scene(scene, rng, n=14)
    assert len(qs) == 14 and len({q["question"] for q in qs}) == 14
    for q in qs:
        assert q["answer"] == oracle(q["question"], scene["objects"]), q


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_pixels_match_scene_graph_no_overlap(seed: int) -> None:
    rng = random.Random(seed)
    scene, img = synth.scene_and_image(rng, 256)
    a = np.asarray(img).astype(int)
    h, w, _ = a.shape
    bg = a[0, 0]
    fg = np.any(a != bg, axis=2)
    palette = {tuple(bg), *COLORS.values()}
    assert {tuple(p) for p in np.unique(a.reshape(-1, 3), axis=0)} <= palette  # no blending
    objs = scene["objects"]
    assert 3 <= len(objs) <= 7
    covered = 0
    for o in objs:
        left, lower, right, upper = o["box"]
        assert 0 <= left < right <= w and 0 <= lower < upper <= h
        assert (o["x"], o["y"]) == centre(o)
        crop = a[h - upper : h - lower, left:right]
        mask = np.any(crop != bg, axis=2)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        # Every non-background pixel inside the box has this object's colour: no occlusion.
        assert (crop[mask] == COLORS[o["color"]]).all()
        extent = max(right - left, upper - lower)
        assert (extent < 40) == (o["size"] == "small")
        covered += int(mask.sum())
    assert covered == int(fg.sum())  # nothing drawn outside the boxes
    for i, p in enumerate(objs):
        for q in objs[i + 1 :]:
            (px, py), (qx, qy) = centre(p), centre(q)
            assert abs(px - qx) >= 4 and abs(py - qy) >= 4  # no left/right, above/below ties
            pl, plo, pr, pu = p["box"]
            ql, qlo, qr, qu = q["box"]
            assert pr <= ql or qr <= pl or pu <= qlo or qu <= plo  # boxes disjoint


def test_split_by_image_and_all_qtypes_balanced(tmp_path: Path) -> None:
    s = generate(tmp_path, n=700, seed=5, test_frac=0.25)
    recs = {
        sp: [json.loads(x) for x in (tmp_path / f"{sp}.jsonl").read_text().splitlines()]
        for sp in ("train", "test")
    }
    train_imgs = {r["image"] for r in recs["train"]}
    test_imgs = {r["image"] for r in recs["test"]}
    assert not train_imgs & test_imgs
    assert len(test_imgs) == 35  # 25% of 140 images
    assert all((tmp_path / i).is_file() for i in train_imgs | test_imgs)
    allr = recs["train"] + recs["test"]
    assert len({r["id"] for r in allr}) == 700
    types = Counter(r["meta"]["qtype"] for r in allr)
    assert set(types) == QTYPES
    # Rotation gives 100 each; a scene that cannot support a type passes to the next one.
    assert all(88 <= c <= 112 for c in types.values()), types
    assert s["qtypes"] == dict(types)
    answers = Counter(r["answers"][0] for r in allr if r["answers"][0] in ("yes", "no"))
    assert 0.35 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.65
    for r in allr:
        assert r["meta"]["template"].startswith(r["meta"]["qtype"])
        assert r["answers"][0] == r["answers"][0].lower().strip()


def test_run_synth_resume_and_config_change(tmp_path: Path) -> None:
    cfg = SynthConfig(out=tmp_path, n=30, seed=2, progress=False)
    first = run_synth(cfg)
    assert first["skipped"] is False and first["questions"] == 30
    before = _files_digest(tmp_path)
    again = run_synth(cfg)
    assert again["skipped"] is True and _files_digest(tmp_path) == before
    from vpd.errors import ConfigMismatch

    with pytest.raises(ConfigMismatch):
        run_synth(cfg.model_copy(update={"seed": 3}))
    forced = run_synth(cfg.model_copy(update={"seed": 3, "force": True}))
    assert forced["skipped"] is False
    assert list(tmp_path.glob("train.jsonl.*.bak"))  # old output kept, not mixed
    # A kill before the set completed (no done marker) regenerates rather than skips.
    (tmp_path / "synth.done.json").unlink()
    assert run_synth(cfg.model_copy(update={"seed": 3}))["skipped"] is False


def test_refuses_foreign_train_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"id": "mine"}\n')
    from vpd.errors import VpdError

    with pytest.raises(VpdError, match="not written by"):
        run_synth(SynthConfig(out=tmp_path, n=5, progress=False))
    assert (tmp_path / "train.jsonl").read_text() == '{"id": "mine"}\n'


def test_cli_synth_and_bad_flags(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--n", "12"])
    assert res.exit_code == 0, res.output
    assert (
        len((tmp_path / "d" / "train.jsonl").read_text().splitlines())
        + len((tmp_path / "d" / "test.jsonl").read_text().splitlines())
        == 12
    )
    res = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "d"), "--nn", "3"])
    assert res.exit_code == 2
    # A range error is the config's (through the entry point: one line naming the flag).
    code, err = main_vpd("data", "synth", "--out", str(tmp_path / "e"), "--n", "0")
    assert code == 2 and err == "error: --n: Input should be greater than or equal to 1\n"


def test_cli_user_error_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = run_vpd("data", "synth", "--out", str(tmp_path / "f"), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "directory" in lines[0]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_scene_json_renders_back_to_the_same_pixels(seed: int) -> None:
    # Others (tool backends, tests) may redraw a scene from meta["scene"] alone.
    scene, img = synth.scene_and_image(random.Random(seed))
    again = json.loads(json.dumps(scene))
    img2 = synth.render_scene(again)
    assert again == scene
    assert np.array_equal(np.asarray(img), np.asarray(img2))
