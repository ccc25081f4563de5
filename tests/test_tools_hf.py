"""The `hf` tool backend: model-backed tools, with tiny random models built from configs.

The models are random, so the tests check what the backend itself owns: coordinates,
non-maximum suppression, batching, memoized depth, errors a program can see, and the
whole path from a sandboxed program through the tool server to the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vpd.errors import ToolsUnavailable
from vpd.tools.backends import get_backend
from vpd.tools.backends.base import ImageData, ToolError
from vpd.tools.backends.hf import HFBackend, nms


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    from vpd.tune.tiny import _tokenizer, build_tiny_family

    torch.manual_seed(0)  # random weights, but the same ones every run
    root = tmp_path_factory.mktemp("hf-tools")
    tok = _tokenizer([])
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    size = {"height": 32, "width": 32}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=size),
        tokenizer=tok,
    ).save_pretrained(root / "clip")
    owl = OwlViTForObjectDetection(
        OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    owl.save_pretrained(root / "owl")
    OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok
    ).save_pretrained(root / "owl")
    dpt = DPTForDepthEstimation(
        DPTConfig(
            image_size=32,
            patch_size=16,
            hidden_size=32,
            num_hidden_layers=4,
            backbone_out_indices=[0, 1, 2, 3],
            num_attention_heads=4,
            intermediate_size=37,
            neck_hidden_sizes=[16, 16, 32, 32],
            fusion_hidden_size=16,
            is_hybrid=False,
        )
    )
    dpt.save_pretrained(root / "dpt")
    DPTImageProcessor(size=size).save_pretrained(root / "dpt")
    build_tiny_family("llava", root / "vlm")
    return {
        "detector": str(root / "owl"),
        "clip": str(root / "clip"),
        "vqa": str(root / "vlm"),
        "depth": str(root / "dpt"),
    }


@pytest.fixture(scope="module")
def backend(models: dict[str, str]) -> HFBackend:
    b = get_backend("hf", **models, detect_threshold=0.0, device="cpu")
    assert isinstance(b, HFBackend)
    return b


def _image() -> ImageData:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[10:20, 10:30] = (255, 0, 0)
    return ImageData.from_array(rgb)


# What the detector "sees", as OWL-ViT outputs: (centre x, centre y, width, height) relative
# to the image it was given, and a logit. A and A2 overlap (IoU 84/108 = 0.78), so NMS keeps
# A, the higher; C is under the threshold. Every value is exact in binary floating point.
DETECTIONS = [
    ((0.25, 0.25, 0.25, 0.5), 3.0),  # A: score 0.95
    ((0.28125, 0.25, 0.25, 0.5), 1.0),  # A2: A moved right by 1/32, score 0.73
    ((0.75, 0.75, 0.25, 0.5), 2.0),  # B: score 0.88
    ((0.5, 0.5, 0.125, 0.125), -1.0),  # C: score 0.27
]


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Model outputs the test chooses, set at the model boundary (the forward pass).

    The real pipelines still pre- and post-process around them, so what the backend owns
    (threshold, non-maximum suppression, crop and ViperGPT coordinates, option choice) has
    one right answer. ``pinned["clip"]`` holds CLIP's image-text logits, one per option
    (None: the model's own).
    """
    from transformers import CLIPModel, OwlViTForObjectDetection

    chosen: dict[str, Any] = {"clip": None}
    owl, clip = OwlViTForObjectDetection.forward, CLIPModel.forward

    def owl_forward(self, *args: Any, **kwargs: Any) -> Any:
        out = owl(self, *args, **kwargs)
        batch, patches, labels = out.logits.shape
        logits = torch.full((patches,), -10.0)
        boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]]).repeat(patches, 1)
        for i, (box, logit) in enumerate(DETECTIONS):
            logits[i], boxes[i] = logit, torch.tensor(box)
        out.logits = logits.view(1, patches, 1).expand(batch, patches, labels).clone()
        out.pred_boxes = boxes.expand(batch, patches, 4).clone()
        return out

    def clip_forward(self, *args: Any, **kwargs: Any) -> Any:
        out = clip(self, *args, **kwargs)
        if chosen["clip"] is None:
            return out
        want = torch.tensor([chosen["clip"]], dtype=out.logits_per_image.dtype)
        assert want.shape[1] == out.logits_per_image.shape[1], "one logit per option"
        out.logits_per_image = want.expand(out.logits_per_image.shape[0], -1).clone()
        return out

    monkeypatch.setattr(OwlViTForObjectDetection, "forward", owl_forward)
    monkeypatch.setattr(CLIPModel, "forward", clip_forward)
    return chosen


def test_nms_keeps_the_best_of_each_overlapping_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]], float)
    scores = np.array([0.5, 0.9, 0.3, 0.1])
    assert nms(boxes, scores, 0.3) == [1, 2]
    assert nms(boxes, scores, 0.99) == [1, 0, 2, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.3) == []


def test_detector_boxes_become_vipergpt_coordinates(backend: HFBackend) -> None:
    # Region (left, lower, right, upper) = (10, 5, 50, 45): crop row 0 is y = 45.
    found = [
        {"score": 0.9, "box": {"xmin": 0, "ymin": 0, "xmax": 10, "ymax": 20}},
        {"score": 0.8, "box": {"xmin": 1, "ymin": 1, "xmax": 10, "ymax": 20}},  # duplicate
        {"score": 0.7, "box": {"xmin": 30, "ymin": 30, "xmax": 99, "ymax": 99}},  # clipped
        {"score": 0.6, "box": {"xmin": 5, "ymin": 5, "xmax": 5, "ymax": 9}},  # empty
    ]
    assert backend._boxes(found, (10, 5, 50, 45)) == [(10, 25, 20, 45), (40, 5, 50, 15)]


def test_detect_runs_the_model_and_stays_inside_the_patch(backend: HFBackend) -> None:
    img = _image()
    region = (0, 0, 32, 24)
    single = backend.detect(img, region, "red box")
    batch = backend.detect_batch([(img, region, "red box"), (img, None, "cat")])
    assert batch[0] == single  # one batched pipeline call == the item alone
    assert single and all(isinstance(b, tuple) and len(b) == 4 for b in single)
    for left, lower, right, upper in single:
        assert 0 <= left < right <= 32 and 0 <= lower < upper <= 24
    whole = batch[1]
    for i, a in enumerate(whole):
        assert 0 <= a[0] < a[2] <= 64 and 0 <= a[1] < a[3] <= 48
        assert all(_iou(a, b) <= backend.nms_iou for b in whole[i + 1 :])


def test_detections_are_thresholded_suppressed_and_converted(
    models: dict[str, str], pinned: dict[str, Any]
) -> None:
    b = get_backend("hf", **models, detect_threshold=0.5, device="cpu")
    img = _image()  # 64 x 48
    # The patch (left, lower, right, upper) = (8, 4, 40, 28) is a 32 x 24 crop whose top
    # row is y = 28. A is x 4..12, y 0..12 from the crop's top-left: x 12..20 and, y
    # flipped, 16..28; B is x 20..28, y 12..24: x 28..36, y 4..16. A2 is suppressed, C
    # under the threshold.
    assert b.detect(img, (8, 4, 40, 28), "box") == [(12, 16, 20, 28), (28, 4, 36, 16)]
    # The whole image (64 x 48): A is x 8..24, y 0..24 from the top, B x 40..56, y 24..48.
    both = b.detect_batch([(img, None, "box"), (img, (8, 4, 40, 28), "box")])
    assert both == [[(8, 24, 24, 48), (40, 0, 56, 24)], [(12, 16, 20, 28), (28, 4, 36, 16)]]
    # A lower threshold lets C (x 28..36, y 21..27 from the top) through: 3 objects.
    low = get_backend("hf", **models, detect_threshold=0.2, device="cpu")
    assert low.detect(img, None, "box") == [(8, 24, 24, 48), (40, 0, 56, 24), (28, 21, 36, 27)]


def test_best_text_match_picks_the_option_with_the_highest_score(
    backend: HFBackend, pinned: dict[str, Any]
) -> None:
    img = _image()
    pinned["clip"] = [0.5, 4.0, 1.0]
    assert backend.best_text_match(img, None, ["red", "blue", "green"]) == "blue"
    pinned["clip"] = [4.0, 0.5, 1.0]
    assert backend.best_text_match(img, (0, 0, 32, 24), ["red", "blue", "green"]) == "red"
    pinned["clip"] = [0.0, 1.0]
    res = backend.best_text_match_batch([(img, None, ["cat", "dog"]), (img, None, [])])
    assert res[0] == "dog" and isinstance(res[1], ToolError)


def test_clip_vqa_and_depth_ops(backend: HFBackend) -> None:
    img = _image()
    score = backend.match_score(img, (0, 0, 32, 24), "a red box")
    assert isinstance(score, float) and -1.0 <= score <= 1.0
    answers = backend.answer_batch([(img, None, "What color is it?"), (img, (0, 0, 8, 8), "Hi?")])
    assert all(isinstance(a, str) for a in answers)
    assert answers[0] == backend.answer(img, None, "What color is it?")  # greedy, left-padded
    assert isinstance(backend.verify_property(img, None, "box", "red"), bool)
    d_all = backend.depth(img, None)
    assert "hf_depth" in img.memo and img.memo["hf_depth"].shape == (48, 64)
    assert isinstance(d_all, float) and d_all > 0
    assert backend.depth(img, None) == d_all  # memoized map, same answer


def test_program_errors_are_tool_errors(backend: HFBackend, tmp_path: Path) -> None:
    img = _image()
    res = backend.best_text_match_batch([(img, None, []), (img, None, 7)])
    assert isinstance(res[0], ToolError) and isinstance(res[1], ToolError)
    with pytest.raises(ToolError, match="empty"):
        backend.detect(img, (5, 5, 5, 9), "cat")
    res = backend.detect_batch([(img, None, 42), (img, None, "cat")])
    assert isinstance(res[0], ToolError) and isinstance(res[1], list)
    broken = HFBackend(detector=str(tmp_path / "no-such-model"), device="cpu")
    # Not a program error: the backend is unusable, so the stage must stop.
    with pytest.raises(ToolsUnavailable, match="cannot load the detector model"):
        broken.detect(img, None, "cat")
    with pytest.raises(ToolsUnavailable):
        broken.detect_batch([(img, None, "cat"), (img, None, "dog")])
    with pytest.raises(ToolError, match="detect_threshold"):
        HFBackend(detect_threshold=2.0)


def _one_program(tmp_path: Path, models: dict[str, str]) -> Any:
    from vpd.execute import ExecuteConfig

    Image.fromarray(_image().rgb).save(tmp_path / "scene.png")
    q = {"id": "q0", "image": "scene.png", "question": "What is it?", "answers": ["box"]}
    (tmp_path / "q.jsonl").write_text(json.dumps(q) + "\n")
    program = (
        "def execute_command(image):\n"
        "    boxes = image.find('box')\n"
        "    name = image.best_text_match(['box', 'ball'])\n"
        "    answer = image.simple_query('What is it?')\n"
        "    depth = image.compute_depth()\n"
        "    a = boxes[0]\n"
        "    return ' '.join([str(len(boxes)), name, str(a.left), str(a.upper), str(depth > 0)])\n"
    )
    s = {"id": "q0#0", "qid": "q0", "k": 0, "program": program}
    (tmp_path / "s.jsonl").write_text(json.dumps(s) + "\n")
    return ExecuteConfig(
        samples=tmp_path / "s.jsonl",
        questions=tmp_path / "q.jsonl",
        out=tmp_path / "exec.jsonl",
        backend="hf",
        tools={**models, "device": "cpu", "detect_threshold": 0.0},
        timeout=30,
        workers=1,
        progress=False,
    )


def test_sandboxed_programs_use_the_hf_tools(
    models: dict[str, str], tmp_path: Path, pinned: dict[str, Any]
) -> None:
    from vpd.execute import run_execute

    pinned["clip"] = [0.0, 3.0]  # "ball"
    run_execute(_one_program(tmp_path, models))
    rec = json.loads((tmp_path / "exec.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "ok", rec
    # Threshold 0.0 keeps every box: A, B, C and, on every other patch, a box inside C's
    # (logit -10); NMS leaves A, B, C. A spans x 8..24, y 24..48.
    assert rec["answer"] == "3 ball 8 48 True"
    ops = [c["name"] for c in rec["trace"]]
    assert {"find", "best_text_match", "simple_query", "compute_depth"} <= set(ops)


def test_a_model_that_does_not_load_stops_the_stage_and_records_nothing(
    models: dict[str, str], tmp_path: Path, pinned: dict[str, Any]
) -> None:
    from vpd.execute import run_execute

    broken = {**models, "detector": str(tmp_path / "no-such-model")}
    with pytest.raises(ToolsUnavailable, match="cannot load the detector model"):
        run_execute(_one_program(tmp_path, broken))
    out = tmp_path / "exec.jsonl"
    assert not out.exists() or out.read_text() == ""  # the program is not marked done
    # Fixed (other options: --force), the same command runs the program.
    run_execute(_one_program(tmp_path, models).model_copy(update={"force": True}))
    assert json.loads(out.read_text().splitlines()[0])["status"] == "ok"
