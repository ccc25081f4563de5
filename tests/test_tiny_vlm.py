"""The embedded tiny VLM: the resampler's set loss, the stage-1 captions and their probe,
and the cached three-stage build (tower, connector, caption alignment), each built once,
reused, and rebuilt when its recipe changes. Recipes here are small (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import SMALL_TINY
from vpd.tune import align, model, resampler
from vpd.tune.align import caption, parse_caption, place, score_caption
from vpd.tune.config import TuneConfig
from vpd.tune.resampler import match, object_targets, set_loss

VISION, RESAMPLER, ALIGN = SMALL_TINY.vision, SMALL_TINY.resampler, SMALL_TINY.align

SCENE = {
    "width": 256,
    "height": 256,
    "objects": [
        {"shape": "star", "color": "blue", "size": "large", "x": 200.0, "y": 230.0},
        {"shape": "circle", "color": "red", "size": "small", "x": 30.0, "y": 40.0},
        {"shape": "square", "color": "green", "size": "small", "x": 128.0, "y": 128.0},
    ],
}


def test_caption_lists_the_objects_left_to_right_with_their_place() -> None:
    assert place(SCENE["objects"][0], 256, 256) == "top right"
    assert place(SCENE["objects"][1], 256, 256) == "bottom left"
    assert place(SCENE["objects"][2], 256, 256) == "center"
    assert caption(SCENE) == (
        "Three shapes: a small red circle at the bottom left, a small green square in the "
        "center and a large blue star at the top right."
    )


def test_caption_probe_scores_count_objects_and_places() -> None:
    assert score_caption(caption(SCENE), SCENE) == {
        "count_right": True, "said": 3, "objects": 3, "hit": 3, "placed": 3
    }  # fmt: skip
    said = "Two shapes: a small red circle at the top left and a large blue star at the top right."
    assert parse_caption(said)[0] == 2
    assert score_caption(said, SCENE) == {
        "count_right": False, "said": 2, "objects": 3, "hit": 2, "placed": 1
    }  # fmt: skip
    assert score_caption("", SCENE)["hit"] == 0


def test_set_loss_matches_each_object_to_the_latent_that_reads_it() -> None:
    t = object_targets(SCENE)
    out = torch.full((5, resampler.N_HEAD), -4.0)
    # Latent 3 reads object 0, latent 1 object 2, latent 4 object 1; 0 and 2 hold nothing.
    for latent, obj in ((3, 0), (1, 2), (4, 1)):
        out[latent, 0] = 4.0
        for a in ("color", "shape", "size"):
            lo, _ = resampler._SLICES[a]
            out[latent, lo + int(t[a][obj])] = 6.0
        x, y = t["xy"][obj].tolist()
        out[latent, 13:15] = torch.logit(torch.tensor([x, y]))
    rows, cols = match(out, t)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(1, 2), (3, 0), (4, 1)]
    good = set_loss(out[None], [t], object_weight=5.0)
    shuffled = set_loss(out[[0, 3, 2, 1, 4]][None], [t], object_weight=5.0)  # same set
    assert float(good) == pytest.approx(float(shuffled), rel=1e-5) and float(good) < 0.5
    worse = out.clone()
    worse[3, 0] = -4.0  # latent 3 now says "nothing here" about object 0
    assert float(set_loss(worse[None], [t], 5.0)) > float(good) + 1


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VPD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the real resampler pretraining and caption alignment runs."""
    n = {"connector": 0, "align": 0}
    real_pre, real_align = model.pretrain_connector, model.align_on_captions

    def pre(*a, **k):  # noqa: ANN002, ANN003, ANN202
        n["connector"] += 1
        return real_pre(*a, **k)

    def ali(*a, **k):  # noqa: ANN002, ANN003, ANN202
        n["align"] += 1
        return real_align(*a, **k)

    monkeypatch.setattr(model, "pretrain_connector", pre)
    monkeypatch.setattr(model, "align_on_captions", ali)
    return n


def build(**kw):  # noqa: ANN003, ANN201
    args = {"lm_layers": 1, "vision": VISION, "resampler": RESAMPLER, "align": ALIGN}
    return model.build_tiny_vlm(**{**args, **kw}, progress=False)


def test_stage1_cache_built_once_reused_and_rebuilt_when_its_recipe_changes(
    cache: Path, calls: dict[str, int]
) -> None:
    folder = build()
    assert folder.parent == cache and calls == {"connector": 1, "align": 1}
    info = json.loads((folder / "tiny_vlm.json").read_text())
    probe = info["caption_probe"]
    assert probe["scenes"] == 2 and 0 <= probe["object_recall"] <= 1
    assert len(info["align"]["curve"]) == 2  # 4 captions, batches of 2
    assert json.loads((folder / "resampler.json").read_text())["probe"]["scenes"] == 4
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    assert build() == folder and calls == {"connector": 1, "align": 1}  # reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp

    other = build(align=ALIGN.model_copy(update={"lr": 5e-4}))  # stage 1 changed
    assert other != folder and calls == {"connector": 1, "align": 2}  # connector reused
    third = build(resampler=RESAMPLER.model_copy(update={"steps": 3}))
    assert third not in (folder, other) and calls == {"connector": 2, "align": 3}
    assert build() == folder and calls["align"] == 3  # the first one is still there

    # A recipe's tune.tiny_build picks the stages: align: null skips stage 1, and the build
    # reports the latents the LM is handed (scaled to its word embeddings, image-dependent).
    cfg = TuneConfig(sft=cache / "s.jsonl", out=cache / "o", tiny_lm_layers=1,
                     tiny_build={**SMALL_TINY.model_dump(), "align": None})  # fmt: skip
    bare = cfg.tiny_build.build(cfg.tiny_lm_layers, progress=False)
    assert bare not in (folder, other, third) and calls == {"connector": 2, "align": 3}
    info = json.loads((bare / "tiny_vlm.json").read_text())
    assert "align" not in info and "caption_probe" not in info
    assert 0 < info["latents_pretrained"]["cross_image_cos"] < 1


def test_tiny_vlm_is_a_stock_idefics2_with_one_token_per_latent(cache: Path) -> None:
    from vpd.vlm import load_vlm

    vlm, proc = load_vlm(build(align=None))
    assert type(vlm).__name__ == "Idefics2ForConditionalGeneration"
    cfg = json.loads((build(align=None) / "config.json").read_text())
    assert cfg["model_type"] == "idefics2"
    assert cfg["perceiver_config"]["resampler_n_latents"] == RESAMPLER.latents
    from vpd.tune.vision import draw_scenes

    ((_, im),) = draw_scenes("t", 0, 0, 1, VISION)
    text = proc.apply_chat_template(align.caption_messages(), add_generation_prompt=True)
    ids = proc(text=[text], images=[[im]], return_tensors="pt")["input_ids"][0]
    assert int((ids == vlm.config.image_token_id).sum()) == RESAMPLER.latents
