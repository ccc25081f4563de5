"""The tiny VLM's resampler: a few object-centric image tokens instead of 64 patches.

Counting 64 patch tokens is hard for a 135M LM, and they make every sequence long. The
field's answer is a small set of learned queries that read the patch features (Flamingo's
perceiver resampler, BLIP-2's Q-Former); the tiny VLM uses Idefics2's connector (an MLP from
the tower's width to the LM's, then a perceiver resampler of ``latents`` queries), so the
model is a stock ``Idefics2ForConditionalGeneration`` that loads without vpd.

Pretraining (scene-graph supervision only, never questions or answers)
----------------------------------------------------------------------
On scenes of its own streams (``vpd-vision/resampler...``), with the pretrained tower
frozen (its features computed once), each latent predicts, through linear heads, whether it
holds an object and, if so, its colour, shape, size and centre; latents are matched to the
scene's objects by the Hungarian algorithm on those predictions (DETR's set loss), so every
object gets one latent and the rest learn "nothing here". The probe reports, on held-out
scenes, the attribute accuracy of the matched latents, the centre's error in pixels and how
often the latents' "object here" count equals the scene's.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpd.progress import progress_bar
from vpd.tune.vision import (
    ATTRS,
    SCENE_SIZE,
    VisionRecipe,
    draw_scenes,
    image_processor,
    image_xy,
    warmup_cosine,
)

# Bump when the pretraining code changes what it builds (the recipe alone is hashed too).
RESAMPLER_VERSION = 1
# Head layout on each latent: "an object is here" logit, attribute logits, centre (x, y).
_SLICES = {"object": (0, 1), "color": (1, 7), "shape": (7, 11), "size": (11, 13), "xy": (13, 15)}
N_HEAD = 15
_XY_WEIGHT = 5.0  # L1 of the centre in image fractions: 0.05 (13 px) costs as much as 0.25 nat


class ResamplerRecipe(BaseModel):
    """Everything that decides the pretrained resampler (hashed into the tiny VLM's key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latents: int = Field(16, ge=1)  # image tokens the LM sees (scenes hold up to 8 objects)
    depth: int = Field(1, ge=1)
    heads: int = Field(8, ge=1)
    head_dim: int = Field(72, ge=8)
    kv_heads: int = Field(4, ge=1)
    scenes: int = Field(4000, ge=8)  # features computed once, sampled with replacement
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(30, ge=0)
    object_weight: float = Field(5.0, gt=0)
    latent_init_std: float = Field(0.02, gt=0)
    probe_scenes: int = Field(500, ge=2)
    seed: int = 0

    def key(self, vision: VisionRecipe) -> str:
        spec = {"version": RESAMPLER_VERSION, "vision": vision.key(), **self.model_dump()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def perceiver_config(self) -> dict[str, Any]:
        """Idefics2's ``perceiver_config`` fields."""
        return {
            "resampler_n_latents": self.latents,
            "resampler_depth": self.depth,
            "resampler_n_heads": self.heads,
            "resampler_head_dim": self.head_dim,
            "num_key_value_heads": self.kv_heads,
        }


DEFAULT_RESAMPLER = ResamplerRecipe()


def object_targets(scene: dict[str, Any]) -> dict[str, Any]:
    """Per object of a scene: class ids per attribute and its centre (x, y top-down)."""
    import torch

    objs = scene["objects"]
    t = {a: torch.tensor([names.index(o[a]) for o in objs]) for a, names in ATTRS.items()}
    t["xy"] = torch.tensor([image_xy(o, scene["width"], scene["height"]) for o in objs])
    return t


def match(out: Any, t: dict[str, Any]) -> tuple[Any, Any]:
    """Hungarian matching of latents (rows of ``out``: head outputs) to objects: the cost
    is the attributes' negative log-likelihood, the centre's L1 and "not an object"."""
    import torch
    import torch.nn.functional as F
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        cost = -F.logsigmoid(out[:, 0:1])
        for a in ATTRS:
            cost = cost - out[:, slice(*_SLICES[a])].log_softmax(-1)[:, t[a]]
        xy = out[:, slice(*_SLICES["xy"])].sigmoid()
        cost = cost + _XY_WEIGHT * torch.cdist(xy, t["xy"], p=1)
        rows, cols = linear_sum_assignment(cost.float().numpy())
    return torch.as_tensor(rows), torch.as_tensor(cols)


def set_loss(outs: Any, targets: list[dict[str, Any]], object_weight: float) -> Any:
    """DETR's set loss, averaged over scenes: matched latents learn their object's
    attributes and centre, every latent whether it holds an object."""
    import torch
    import torch.nn.functional as F

    total = outs.new_zeros(())
    for out, t in zip(outs, targets, strict=True):
        rows, cols = match(out, t)
        is_obj = torch.zeros(out.shape[0], device=out.device)
        is_obj[rows] = 1
        loss = object_weight * F.binary_cross_entropy_with_logits(out[:, 0], is_obj)
        for a in ATTRS:
            loss = loss + F.cross_entropy(out[rows][:, slice(*_SLICES[a])], t[a][cols])
        xy = out[rows][:, slice(*_SLICES["xy"])].sigmoid()
        loss = loss + _XY_WEIGHT * (xy - t["xy"][cols]).abs().sum(-1).mean()
        total = total + loss
    return total / len(targets)


def tower_features(
    vision_model: Any, vision: VisionRecipe, stream: str, n: int, seed: int, batch: int = 100
) -> tuple[Any, list[dict[str, Any]]]:
    """The frozen tower's output (what the connector reads) for ``n`` scenes of ``stream``."""
    import torch

    proc = image_processor(vision)
    feats, scenes = [], []
    with torch.inference_mode():
        for start in range(0, n, batch):
            pairs = draw_scenes(stream, seed, start, min(batch, n - start), vision)
            pix = proc(images=[im for _, im in pairs], return_tensors="pt")["pixel_values"]
            feats.append(vision_model(pixel_values=pix).last_hidden_state)
            scenes += [s for s, _ in pairs]
    return torch.cat(feats), scenes


def latent_stats(
    connector: Any, vision_model: Any, vision: VisionRecipe, seed: int
) -> dict[str, float]:
    """What the LM is handed, on 50 held-out scenes: the latents' root-mean-square, and the
    mean cosine between the same latent of two different images (near 1: the tokens say
    the same whatever the image)."""
    import torch
    import torch.nn.functional as F

    x, _ = tower_features(vision_model, vision, "resampler-probe", 50, seed)
    with torch.no_grad():
        lat = connector(x, attention_mask=torch.ones(x.shape[:2], dtype=torch.bool)).float()
    cos = F.cosine_similarity(lat[:-1], lat[1:], dim=-1).mean()
    return {
        "rms": round(float(lat.pow(2).mean(-1).sqrt().mean()), 4),
        "cross_image_cos": round(float(cos), 4),
    }


def pretrain_connector(
    connector: Any,
    vision_model: Any,
    vision: VisionRecipe,
    recipe: ResamplerRecipe,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``connector`` (Idefics2's MLP + perceiver, in place) with the set loss on frozen
    tower features; returns its log, probe and the trained ``heads`` (a Linear module)."""
    import torch

    torch.manual_seed(recipe.seed)
    width = connector.perceiver_resampler.hidden_size
    with torch.no_grad():
        # Idefics2 starts every latent at ones: identical queries, which never part. At
        # N(0, 1) they part, but the queries then dominate the latents' output: 95% of it
        # the same for every image, and the tuned LM read nothing from them. Small ones
        # leave half of the output to the image.
        connector.perceiver_resampler.latents.normal_(0.0, recipe.latent_init_std)
    heads = torch.nn.Linear(width, N_HEAD)
    t0 = time.time()
    x, scenes = tower_features(vision_model, vision, "resampler", recipe.scenes, recipe.seed)
    targets = [object_targets(s) for s in scenes]
    features_s = time.time() - t0
    params = [*connector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, recipe.warmup, recipe.steps)
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    mask = torch.ones(recipe.batch_size, x.shape[1], dtype=torch.bool)
    curve = []
    connector.train()
    with progress_bar("tiny VLM: pretraining the resampler", recipe.steps, "step", progress) as bar:
        for step in range(recipe.steps):
            idx = torch.randint(0, len(x), (recipe.batch_size,), generator=gen)
            outs = heads(connector(x[idx], attention_mask=mask))
            loss = set_loss(outs, [targets[i] for i in idx], recipe.object_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 20 == 0 or step == recipe.steps - 1:
                curve.append({"step": step, "loss": round(float(loss.detach()), 4)})
            bar.advance()
    connector.eval()
    train_s = time.time() - t0
    probe = probe_connector(connector, heads, vision_model, vision, recipe)
    return {
        "features_s": round(features_s, 1),
        "train_s": round(train_s, 1),
        "curve": curve,
        "probe": probe,
        "heads": heads,
    }


def probe_connector(
    connector: Any, heads: Any, vision_model: Any, vision: VisionRecipe, recipe: ResamplerRecipe
) -> dict[str, Any]:
    """On held-out scenes: accuracy of the matched latents' attributes, their centres' mean
    error in scene pixels, and the share of scenes whose "object here" latents number
    exactly its objects (with the histogram of the differences)."""
    import torch

    x, scenes = tower_features(
        vision_model, vision, "resampler-probe", recipe.probe_scenes, recipe.seed
    )
    with torch.no_grad():
        outs = heads(connector(x, attention_mask=torch.ones(x.shape[:2], dtype=torch.bool)))
    right = dict.fromkeys(ATTRS, 0)
    n_obj = exact = 0
    xy_err = 0.0
    diffs: dict[int, int] = {}
    for out, scene in zip(outs, scenes, strict=True):
        t = object_targets(scene)
        rows, cols = match(out, t)
        n_obj += len(cols)
        for a in ATTRS:
            right[a] += int((out[rows][:, slice(*_SLICES[a])].argmax(-1) == t[a][cols]).sum())
        xy = out[rows][:, slice(*_SLICES["xy"])].sigmoid()
        xy_err += float((xy - t["xy"][cols]).abs().sum())
        d = int((out[:, 0] > 0).sum()) - len(scene["objects"])
        diffs[d] = diffs.get(d, 0) + 1
        exact += d == 0
    return {
        "scenes": len(scenes),
        "objects": n_obj,
        "accuracy": {a: round(right[a] / n_obj, 4) for a in ATTRS},
        "centre_err_px": round(SCENE_SIZE * xy_err / (2 * n_obj), 2),
        "count_exact": round(exact / len(scenes), 4),
        "count_diff": {str(k): diffs[k] for k in sorted(diffs)},
    }
