"""The tiny VLM's vision tower: scene-graph targets, pretraining cache, probe, placement."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from vpd.data import synth
from vpd.tune import vision
from vpd.tune.vision import (
    VisionRecipe,
    build_vision_tower,
    cell_targets,
    centre_cell,
    fit_linear_probe,
    load_tower,
    run_probe,
)

# Seconds, not minutes: a 1-layer tower on 64 px scenes, a few steps.
TINY = VisionRecipe(
    image_size=64,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    layers=1,
    heads=2,
    steps=3,
    batch_size=4,
    probe_train_scenes=12,
    probe_test_scenes=8,
)


@pytest.fixture
def count_pretrain(monkeypatch: pytest.MonkeyPatch) -> list[VisionRecipe]:
    """Records every real pretraining run (the function still runs)."""
    calls: list[VisionRecipe] = []
    real = vision.pretrain

    def counted(recipe: VisionRecipe, progress: bool = True):  # noqa: ANN202
        calls.append(recipe)
        return real(recipe, progress)

    monkeypatch.setattr(vision, "pretrain", counted)
    return calls


def test_centre_cells_follow_the_scene_graph() -> None:
    # y grows upward in scene graphs and downward in patch rows.
    scene = {
        "width": 256,
        "height": 256,
        "objects": [
            {"shape": "star", "color": "blue", "size": "large", "x": 10.0, "y": 250.0},
            {"shape": "circle", "color": "red", "size": "small", "x": 200.0, "y": 40.0},
        ],
    }
    assert centre_cell(scene["objects"][0], 256, 256, 8) == (0, 10 / 32, 6 / 32)
    i, dx, dy = centre_cell(scene["objects"][1], 256, 256, 8)
    assert i == 6 * 8 + 6 and dx == pytest.approx(0.25) and dy == pytest.approx(0.75)
    t = cell_targets([scene], 8)
    assert t["mask"][0].nonzero().flatten().tolist() == [0, 54]
    assert t["color"][0, 0] == list(synth.COLORS).index("blue")
    assert t["shape"][0, 54] == synth.SHAPES.index("circle")
    assert t["size"][0, 54] == synth.SIZES.index("small")
    assert t["offset"][0, 54].tolist() == pytest.approx([0.25, 0.75])
    # Where the centre lies in the whole image (x right, y down): 200/256 and 1 - 40/256.
    assert t["position"][0, 54].tolist() == pytest.approx([200 / 256, 216 / 256])
    assert t["position"][0, 0].tolist() == pytest.approx([10 / 256, 6 / 256])


def test_pretraining_scenes_are_never_a_runs_scenes() -> None:
    def objects(rng: random.Random) -> list:
        scene, _ = synth.scene_and_image(rng, 256, 1, 8)
        return [(o["shape"], o["color"], o["size"], o["x"], o["y"]) for o in scene["objects"]]

    ours = {
        tuple(objects(vision.scene_rng(s, 0, i)))
        for s in ("train", "probe-test")
        for i in range(40)
    }
    for seed in range(3):
        for i in range(40):
            assert tuple(objects(random.Random(f"vpd-synth/{seed}/{i}"))) not in ours


def test_tower_is_built_once_reused_and_rebuilt_when_its_recipe_changes(
    tmp_path: Path, count_pretrain: list
) -> None:
    folder = build_vision_tower(TINY, tmp_path, progress=False)
    assert folder.name == f"vision-{TINY.key()}" and len(count_pretrain) == 1
    for name in ("config.json", "model.safetensors", "probe.json", "probe.png", "pretrain.json"):
        assert (folder / name).is_file(), name
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["recipe"] == TINY.model_dump() and info["scenes_seen"] == 12
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    assert build_vision_tower(TINY, tmp_path, progress=False) == folder  # reused
    assert len(count_pretrain) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    other = TINY.model_copy(update={"steps": 4})
    assert other.key() != TINY.key()
    assert build_vision_tower(other, tmp_path, progress=False) != folder
    assert len(count_pretrain) == 2
    assert build_vision_tower(TINY, tmp_path, progress=False) == folder  # the old one stays


def test_a_half_built_tower_is_rebuilt(tmp_path: Path, count_pretrain: list) -> None:
    folder = tmp_path / f"vision-{TINY.key()}"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # killed mid-write: no stamp
    assert build_vision_tower(TINY, tmp_path, progress=False) == folder
    assert len(count_pretrain) == 1 and (folder / "model.safetensors").exists()


def test_concurrent_builds_pretrain_once(tmp_path: Path, count_pretrain: list) -> None:
    got: list[Path] = []
    threads = [
        threading.Thread(target=lambda: got.append(build_vision_tower(TINY, tmp_path, False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 3 and len(count_pretrain) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vision-") and p.is_dir()]


def test_linear_probe_reads_what_features_encode() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 16, generator=g) * 0.1
    x[:, :4] += torch.nn.functional.one_hot(y, 4) * 2  # classes live in 4 feature dims
    predict = fit_linear_probe(x[:300], y[:300], 4)
    assert (predict(x[300:]) == y[300:]).float().mean() == 1.0
    noise = torch.randint(0, 4, (400,), generator=g)  # labels the features do not encode
    chance = (fit_linear_probe(x[:300], noise[:300], 4)(x[300:]) == noise[300:]).float().mean()
    assert chance < 0.5


def test_probe_reports_each_attribute_on_held_out_scenes(tmp_path: Path) -> None:
    folder = build_vision_tower(TINY, tmp_path, progress=False)
    rep, preds = run_probe(load_tower(folder), TINY)
    assert set(rep["accuracy"]) == {"color", "shape", "size"}
    assert all(0.0 <= v <= 1.0 for v in rep["accuracy"].values())
    assert rep["test_scenes"] == 8 and rep["test_objects"] == len(preds["objects"]) > 0
    assert {o["scene"] for o in preds["objects"]} <= set(range(8))
    assert json.loads((folder / "probe.json").read_text())["accuracy"] == rep["accuracy"]
    assert rep["position_err_px"] >= 0


def test_position_probe_reads_a_linear_position_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 256
    feats = torch.cat([xy / 256, torch.randn(300, 6, generator=g) * 0.01], dim=1)
    assert vision.position_probe(feats[:200], xy[:200], feats[200:], xy[200:]) < 1.0
    noise = torch.randn(300, 8, generator=g)
    assert vision.position_probe(noise[:200], xy[:200], noise[200:], xy[200:]) > 40


@pytest.mark.slow
def test_the_default_tower_sees_colour_shape_and_size() -> None:
    """The shipped recipe's tower (built once per machine, then cached): a fresh linear
    probe reads each attribute of objects in unseen scenes with at least 90% accuracy."""
    folder = build_vision_tower(progress=False)
    rep, _ = run_probe(load_tower(folder), vision.DEFAULT_RECIPE)
    assert min(rep["accuracy"].values()) >= 0.9, rep["accuracy"]
    assert min(rep["accuracy_by_size"]["shape"].values()) >= 0.85, rep["accuracy_by_size"]
    # The features keep where an object is (the resampler reads it from them): 8.9 px
    # here, against 64 for guessing the middle.
    assert rep["position_err_px"] < 16, rep["position_err_px"]
