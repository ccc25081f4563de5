"""The tools' ``vlm`` mode: VLM ops answered by a VLM folder, with a tiny random VLM.

The model is random, so the tests check what the mode owns: which ops go to the model and
which stay classical CV, the questions and views it builds, batching (batched answers equal
one-at-a-time answers), the server's cache, the parent-side model behind a sandboxed
program, and the errors a program or a user sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import read_jsonl, write_jsonl
from tests.test_eval import build_tiny_llava
from vpd.errors import ToolsUnavailable
from vpd.tools.backends import get_backend
from vpd.tools.backends.base import ImageData, ToolError
from vpd.tools.backends.vlm import (
    VlmTools,
    match_option,
    pointer_width,
    question_for,
    result_from,
    view_image,
    yes_no,
)
from vpd.tools.protocol import ToolRequest
from vpd.tools.server import ToolServer


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("vlm-tool"), seed=3)


def _scene() -> ImageData:
    rgb = np.full((64, 80, 3), 255, np.uint8)
    rgb[8:24, 8:24] = (255, 0, 0)  # a red square near the top left
    rgb[40:60, 50:70] = (0, 0, 255)  # a blue square near the bottom right
    return ImageData.from_array(rgb)


# ----------------------------------------------------------------------------- questions


def test_each_op_becomes_one_question_and_its_reply_the_result() -> None:
    assert question_for("simple_query", {"question": " What  color is it? "}) == (
        "What color is it?"
    )
    assert question_for("verify_property", {"name": "circle", "prop": "red"}) == (
        "Is the circle red?"
    )
    assert question_for("best_text_match", {"options": ["red", "blue", "green"]}) == (
        "Is it red, blue or green?"
    )
    with pytest.raises(ToolError, match="not a VLM op"):
        question_for("find", {"name": "x"})
    with pytest.raises(ToolError, match="non-empty list"):
        question_for("best_text_match", {"options": []})
    assert result_from("simple_query", {}, "So the answer is Blue.") == "blue"
    assert result_from("verify_property", {}, "Yes, it is.") is True
    assert result_from("verify_property", {}, "banana") is False
    opts = {"options": ["red", "dark red", "blue"]}
    assert result_from("best_text_match", opts, "It is dark red.") == "dark red"
    assert result_from("best_text_match", opts, "Blue") == "blue"
    assert result_from("best_text_match", opts, "purple") == "red"  # must pick one
    assert match_option("purple", opts["options"]) is None
    assert yes_no("No.") == "no" and yes_no("maybe") is None


# ----------------------------------------------------------------------------- views


def test_crop_view_is_the_patch_pixels() -> None:
    img = _scene()
    box = (8, 40, 24, 56)  # the red square: rows 8..24 from the top of a 64-px image
    crop = np.asarray(view_image(img.pil, box, "crop"))
    assert crop.shape == (16, 16, 3)
    assert np.array_equal(crop, img.rgb[8:24, 8:24])
    with pytest.raises(ToolError, match="empty"):
        view_image(img.pil, (5, 5, 5, 9), "crop")
    with pytest.raises(ToolError, match="unknown view"):
        view_image(img.pil, box, "zoom")


def test_pointer_view_frames_the_patch_without_touching_it() -> None:
    img = _scene()
    box = (8, 40, 24, 56)  # PIL: x 8..24, y 8..24
    out = np.asarray(view_image(img.pil, box, "pointer"))
    lw = pointer_width(80, 64)
    assert out.shape == img.rgb.shape and lw >= 2
    assert np.array_equal(out[8:24, 8:24], img.rgb[8:24, 8:24])  # the object is untouched
    red = np.array([255, 0, 0])
    for k in range(1, lw + 1):  # every ring just outside the patch is red
        assert (out[8 - k, 8 - k : 24 + k] == red).all()  # top
        assert (out[24 - 1 + k, 8 - k : 24 + k] == red).all()  # bottom
        assert (out[8 - k : 24 + k, 8 - k] == red).all()  # left
        assert (out[8 - k : 24 + k, 24 - 1 + k] == red).all()  # right
    beyond = lw + 1
    assert (out[8 - beyond, 8:24] == 255).all()  # nothing drawn beyond the frame
    changed = np.any(out != img.rgb, axis=2)
    assert changed.sum() == ((16 + 2 * lw) ** 2 - 16**2)  # the frame and nothing else
    whole = np.asarray(view_image(img.pil, None, "pointer"))
    assert np.array_equal(whole, img.rgb)  # the whole image needs no pointer


# ----------------------------------------------------------------------------- the model


def test_batched_answers_equal_unbatched(vlm_dir: Path) -> None:
    img = _scene()
    items = [
        (img, None, {"question": "What color is the big square in the image?"}),
        (img, (8, 40, 24, 56), {"question": "What color?"}),
        (img, (50, 4, 70, 24), {"question": "How many squares are there?"}),
        (img, (0, 0, 40, 64), {"question": "Is there a red square to the left?"}),
        (img, (5, 5, 5, 9), {"question": "What is this?"}),  # empty patch: its own error
    ]
    one = VlmTools(str(vlm_dir), device="cpu", batch_size=1, max_new_tokens=6)
    many = VlmTools(str(vlm_dir), device="cpu", batch_size=4, max_new_tokens=6)
    a = one.run("simple_query", items)
    b = many.run("simple_query", items)
    assert isinstance(a[-1], ToolError) and isinstance(b[-1], ToolError)
    assert a[:-1] == b[:-1] and all(isinstance(x, str) for x in a[:-1])
    assert one.calls == 4 and many.calls == 1  # really batched: one model call for four
    # The raw replies agree too, and the answers are the replies read as the op reads them.
    raw = one.ask([(img, b_, it["question"]) for img, b_, it in items[:-1]])
    assert raw == many.ask([(img, b_, it["question"]) for img, b_, it in items[:-1]])
    assert a[:-1] == [result_from("simple_query", {}, r) for r in raw]


def test_synthetic_backend_sends_only_the_vlm_ops_to_the_vlm(vlm_dir: Path) -> None:
    img = _scene()
    cv = get_backend("synthetic")
    b = get_backend(
        "synthetic", vqa=str(vlm_dir), vqa_ops="simple_query,verify_property", device="cpu"
    )
    asked = b.answer_batch([(img, None, "What color is it?")])
    assert asked == b.vlm.run("simple_query", [(img, None, {"question": "What color is it?"})])
    assert isinstance(b.verify_property_batch([(img, None, "square", "red")])[0], bool)
    assert b.vlm.calls == 3
    # Not in vqa_ops, and not a VLM op at all: classical CV, as without the mode.
    opts = ["red", "blue"]
    assert b.best_text_match_batch([(img, (8, 40, 24, 56), opts)]) == ["red"]
    assert b.detect_batch([(img, None, "blue square")]) == cv.detect_batch(
        [(img, None, "blue square")]
    )
    assert b.vlm.calls == 3
    with pytest.raises(Exception, match="vqa_ops"):
        get_backend("synthetic", vqa=str(vlm_dir), vqa_ops="find")
    with pytest.raises(Exception, match="vqa_view"):
        get_backend("synthetic", vqa=str(vlm_dir), vqa_view="zoom")


def test_server_caches_vlm_answers(vlm_dir: Path, tmp_path: Path) -> None:
    Image.fromarray(_scene().rgb).save(tmp_path / "scene.png")
    server = ToolServer(get_backend("synthetic", vqa=str(vlm_dir), device="cpu"))
    img = str(tmp_path / "scene.png")
    reqs = [
        ToolRequest("simple_query", img, None, {"question": "What color is it?"}),
        ToolRequest("best_text_match", img, (8, 40, 24, 56), {"options": ["red", "blue"]}),
        ToolRequest("verify_property", img, None, {"name": "square", "prop": "blue"}),
        ToolRequest("simple_query", img, None, {"question": "What color is it?"}),  # repeat
    ]
    first = server.call_batch(reqs)
    assert all(r.ok for r in first) and first[0].result == first[3].result
    assert first[1].result in ("red", "blue") and isinstance(first[2].result, bool)
    calls = server.backend.vlm.calls
    again = server.call_batch(reqs)
    assert [r.result for r in again] == [r.result for r in first]
    assert server.backend.vlm.calls == calls  # all from the cache
    assert server.cache_stats()["hits"] >= 5


def test_a_sandboxed_program_asks_the_parents_vlm(vlm_dir: Path, tmp_path: Path) -> None:
    from vpd.execute import ExecuteConfig, run_execute
    from vpd.store import read_meta

    Image.fromarray(_scene().rgb).save(tmp_path / "scene.png")
    q = {"id": "q0", "image": "scene.png", "question": "What color is the square?"}
    write_jsonl(tmp_path / "q.jsonl", [q])
    program = (
        "def execute_command(image):\n"
        "    image_patch = ImagePatch(image)\n"
        "    squares = image_patch.find('square')\n"
        "    return squares[0].simple_query('What color is this?')\n"
    )
    visprog = (
        "BOX0=LOC(image=IMAGE,object='square')\n"
        "IMAGE0=CROP(image=IMAGE,box=BOX0)\n"
        "ANSWER0=VQA(image=IMAGE0,question='What color is this?')\n"
        "FINAL_RESULT=RESULT(var=ANSWER0)"
    )
    rows = [
        {"id": "q0#0", "qid": "q0", "k": 0, "program": program},
        {"id": "q0#1", "qid": "q0", "k": 1, "program": visprog, "syntax": "visprog"},
    ]
    write_jsonl(tmp_path / "s.jsonl", rows)
    server = ToolServer(get_backend("synthetic", vqa=str(vlm_dir), device="cpu"))
    cfg = ExecuteConfig(
        samples=tmp_path / "s.jsonl",
        questions=tmp_path / "q.jsonl",
        out=tmp_path / "e.jsonl",
        tools={"vqa": str(vlm_dir), "device": "cpu"},
        progress=False,
    )
    run_execute(cfg, tools=server)
    # Written in the order the programs finished: look them up by id.
    recs = sorted(read_jsonl(tmp_path / "e.jsonl"), key=lambda r: r["id"])
    assert [r["id"] for r in recs] == ["q0#0", "q0#1"]
    assert [r["status"] for r in recs] == ["ok", "ok"], recs
    # The model ran here, in the parent; both syntaxes asked it the same cached question.
    assert server.backend.vlm.calls == 1
    want = server.backend.vlm.run(
        "simple_query",
        [
            (
                ImageData.load(tmp_path / "scene.png"),
                (8, 40, 24, 56),
                {"question": "What color is this?"},
            )
        ],
    )[0]
    assert recs[0]["answer"] == recs[1]["answer"] == want
    names = [c["name"] for c in recs[1]["trace"] if c["name"] != "size"]
    assert names == ["find", "crop", "simple_query"]
    assert read_meta(tmp_path / "e.jsonl")["vqa_digest"]  # a re-trained folder is not resumed


def test_an_unloadable_vqa_model_stops_the_stage(tmp_path: Path) -> None:
    b = get_backend("synthetic", vqa=str(tmp_path / "no-such-vlm"))
    with pytest.raises(ToolsUnavailable, match="cannot load the vqa model"):
        b.answer_batch([(_scene(), None, "What is it?")])
    # Through the server too: the stage stops instead of failing every program.
    Image.fromarray(_scene().rgb).save(tmp_path / "scene.png")
    req = ToolRequest("simple_query", str(tmp_path / "scene.png"), None, {"question": "Hi?"})
    with pytest.raises(ToolsUnavailable):
        ToolServer(b).call_batch([req])


def test_both_backends_ask_the_same_vlm_the_same_way(vlm_dir: Path) -> None:
    img = _scene()
    syn = get_backend("synthetic", vqa=str(vlm_dir), device="cpu")
    hf = get_backend("hf", vqa=str(vlm_dir), device="cpu")
    items = [(img, None, "What color is it?"), (img, (8, 40, 24, 56), "What shape?")]
    assert hf.answer_batch(items) == syn.answer_batch(items)
    assert hf.answer(img, None, "What color is it?") == syn.answer_batch(items[:1])[0]
    props = [(img, None, "square", "red"), (img, (50, 4, 70, 24), "square", "blue")]
    assert hf.verify_property_batch(props) == syn.verify_property_batch(props)
    assert "best_text_match" not in hf.vlm.ops  # the hf backend keeps CLIP for it by default
