"""The tiny VLM's vision tower, pretrained for the synthetic world, and a probe of what it sees.

Real VLMs start from a vision encoder pretrained on photos (CLIP, SigLIP); the embedded tiny
VLM starts from one pretrained on synthetic shape scenes, so that tuning on a few hundred
questions teaches the language model to *read* the image, not the tower to *see*.

Pretraining (scene-graph supervision only, never questions or answers)
----------------------------------------------------------------------
A SigLIP vision transformer (``SiglipVisionModel``, so LLaVA loads it as its tower) looks at
scenes drawn by :func:`vpd.data.synth.scene_and_image` from their own random streams
(``vpd-vision/...``), disjoint by construction from any run's data (``vpd-synth/<seed>/...``).
The image is cut into a ``g x g`` grid of patches. Linear heads on the tower's last hidden
state (exactly the features LLaVA hands to its projector) predict, for every patch, whether
an object's centre lies in it and, for the patches that hold one, the object's colour,
shape and size and where in the patch its centre lies. Objects' boxes are >= 6 px apart,
so two centres never share a patch of an 8 x 8 grid, and the "object here" patches count
the objects. Fresh scenes every step: no scene is seen twice.

Probe
-----
:func:`run_probe` freezes the tower, reads the feature of each object's centre patch on
scenes of two further streams (probe-train, probe-test), fits a linear classifier per
attribute on the first and reports its accuracy on the second (overall and per object
size), with a figure (``probe.png``): what the frozen features say about colour, shape and
size of objects in scenes the tower never saw.

Cache
-----
:func:`build_vision_tower` pretrains once per machine into ``<cache>/vision-<key>`` (key:
a hash of the recipe and of :data:`VISION_VERSION`), under a lock and atomically
(:mod:`vpd.tune.cache`); a changed recipe gets a new folder.

    python -m vpd.tune.vision --figure docs/vision_probe.png    # build (or reuse) + probe
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpd.cache import atomic_fill, cache_root, is_complete
from vpd.data.synth import COLORS, SHAPES, SIZES, scene_and_image
from vpd.errors import VpdError
from vpd.progress import progress_bar, quiet_transformers
from vpd.store import read_json

# Bump when the pretraining code changes what it builds (the recipe alone is hashed too).
VISION_VERSION = 2
SCENE_SIZE = 256  # the synthetic scenes' native size (vpd data synth's default)
ATTRS = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
# Head layout on each patch: the attribute logits (read where an object's centre lies), an
# "an object is centred here" logit, the centre's offset inside the patch, and where the
# centre lies in the whole image: without that last target the features forget their
# patch's place (a linear probe of it erred by 1.8 patches of 8), and a resampler reading
# them cannot tell where an object is.
_SLICES = {
    "color": (0, 6),
    "shape": (6, 10),
    "size": (10, 12),
    "object": (12, 13),
    "offset": (13, 15),
    "position": (15, 17),
}
N_HEAD = 17
# Objects are a few of the patches: the "object here?" loss counts this much more.
_OBJECT_WEIGHT = 4.0


class VisionRecipe(BaseModel):
    """Everything that decides the pretrained tower (its cache key is a hash of this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(128, ge=32)  # scenes are 256 px; resized by the image processor
    patch_size: int = Field(16, ge=4)  # 8 x 8 patches = 64 image tokens for the LM
    hidden_size: int = Field(192, ge=16)
    intermediate_size: int = Field(768, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(6, ge=1)  # 32-dim heads: 3 of 64 dims learnt shapes far slower
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    min_objects: int = Field(1, ge=1, le=10)
    max_objects: int = Field(8, ge=1, le=10)
    seed: int = 0
    probe_train_scenes: int = Field(300, ge=2)
    probe_test_scenes: int = Field(200, ge=2)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def key(self) -> str:
        spec = {"version": VISION_VERSION, **self.model_dump()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def vision_config(self) -> dict[str, Any]:
        """The ``SiglipVisionConfig`` fields (what LLaVA's ``vision_config`` holds)."""
        if self.image_size % self.patch_size:
            raise VpdError("vision image_size must be a multiple of patch_size")
        if self.hidden_size % self.heads:
            raise VpdError("vision hidden_size must be a multiple of heads")
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            # LLaVA reads hidden states, never SigLIP's pooling head: do not carry one.
            "vision_use_head": False,
        }


DEFAULT_RECIPE = VisionRecipe()


def image_processor(recipe: VisionRecipe) -> Any:
    """The processor the tower is trained with; the tiny VLM saves this very one."""
    # The import itself logs "requires torchvision, falling back to PIL" without it.
    with quiet_transformers():
        from transformers import SiglipImageProcessor

        return SiglipImageProcessor(
            size={"height": recipe.image_size, "width": recipe.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_convert_rgb=True,
        )


# ----------------------------------------------------------------------------- scenes


def scene_rng(stream: str, seed: int, index: int) -> random.Random:
    """Scene ``index`` of a pretraining stream; never equal to a run's ``vpd-synth/...``."""
    return random.Random(f"vpd-vision/{stream}/{seed}/{index}")


def draw_scenes(
    stream: str, seed: int, start: int, n: int, recipe: VisionRecipe
) -> list[tuple[dict[str, Any], Any]]:
    """``n`` (scene graph, image) pairs of ``stream``, from scene ``start`` on."""
    return [
        scene_and_image(
            scene_rng(stream, seed, i), SCENE_SIZE, recipe.min_objects, recipe.max_objects
        )
        for i in range(start, start + n)
    ]


def centre_cell(
    obj: dict[str, Any], width: int, height: int, grid: int
) -> tuple[int, float, float]:
    """(patch index, x and y offset of the centre inside the patch in [0, 1)) of an object."""
    gx = obj["x"] / width * grid
    gy = (height - obj["y"]) / height * grid  # synth's y grows upward; patches go top-down
    cx, cy = min(int(gx), grid - 1), min(int(gy), grid - 1)
    return cy * grid + cx, gx - cx, gy - cy


def image_xy(obj: dict[str, Any], width: int, height: int) -> tuple[float, float]:
    """An object's centre as a fraction of the image, x rightward and y DOWNWARD (rows)."""
    return obj["x"] / width, (height - obj["y"]) / height


def cell_targets(scenes: list[dict[str, Any]], grid: int) -> dict[str, Any]:
    """Per-patch targets from scene graphs: class ids per attribute, the centre's offset in
    its patch and its place in the image (x, y in [0, 1], y top-down), meaningful where
    ``mask``: the patches holding an object's centre."""
    import torch

    n, cells = len(scenes), grid * grid
    out = {a: torch.zeros(n, cells, dtype=torch.long) for a in ATTRS}
    out["offset"] = torch.zeros(n, cells, 2)
    out["position"] = torch.zeros(n, cells, 2)
    out["mask"] = torch.zeros(n, cells, dtype=torch.bool)
    for b, scene in enumerate(scenes):
        for obj in scene["objects"]:
            i, dx, dy = centre_cell(obj, scene["width"], scene["height"], grid)
            for a, names in ATTRS.items():
                out[a][b, i] = names.index(obj[a])
            out["offset"][b, i] = torch.tensor([dx, dy])
            out["position"][b, i] = torch.tensor(image_xy(obj, scene["width"], scene["height"]))
            out["mask"][b, i] = True
    return out


# ----------------------------------------------------------------------------- model


def new_tower(recipe: VisionRecipe) -> Any:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(**recipe.vision_config()))


def features(tower: Any, pixel_values: Any) -> Any:
    """What LLaVA feeds its projector: the last hidden state, every patch (batch, cells, d)."""
    return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


def pretrain_loss(logits: Any, t: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Attributes, offset and position on object patches, "object centred here?" on every
    patch."""
    import torch.nn.functional as F

    mask = t["mask"]
    on = logits[mask]
    parts = {}
    for a in ATTRS:
        lo, hi = _SLICES[a]
        parts[a] = F.cross_entropy(on[:, lo:hi], t[a][mask])
    lo, _ = _SLICES["object"]
    parts["object"] = _OBJECT_WEIGHT * F.binary_cross_entropy_with_logits(
        logits[..., lo], mask.float()
    )
    lo, hi = _SLICES["offset"]
    parts["offset"] = (on[:, lo:hi].sigmoid() - t["offset"][mask]).abs().sum(-1).mean()
    lo, hi = _SLICES["position"]
    parts["position"] = (on[:, lo:hi].sigmoid() - t["position"][mask]).abs().sum(-1).mean()
    loss = sum(parts.values())
    return loss, {k: round(float(v.detach()), 4) for k, v in parts.items()}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up, then a cosine down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(recipe: VisionRecipe, progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Train a tower from scratch; returns ``(tower, heads, log)``."""
    import torch

    torch.manual_seed(recipe.seed)
    tower = new_tower(recipe)
    heads = torch.nn.Linear(recipe.hidden_size, N_HEAD)
    proc = image_processor(recipe)
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warm = max(1, round(recipe.warmup * recipe.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warm, recipe.steps)
    )
    tower.train()
    curve: list[dict[str, Any]] = []
    t0 = time.time()
    with progress_bar("vision tower: pretraining", recipe.steps, "step", progress) as bar:
        for step in range(recipe.steps):
            pairs = draw_scenes(
                "train", recipe.seed, step * recipe.batch_size, recipe.batch_size, recipe
            )
            pix = proc(images=[im for _, im in pairs], return_tensors="pt")["pixel_values"]
            t = cell_targets([s for s, _ in pairs], recipe.grid)
            loss, parts = pretrain_loss(heads(features(tower, pix)), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == recipe.steps - 1:
                curve.append({"step": step, "loss": round(float(loss.detach()), 4), **parts})
            bar.advance()
    tower.eval()
    log = {
        "scenes_seen": recipe.steps * recipe.batch_size,
        "train_s": round(time.time() - t0, 1),
        "final_loss": curve[-1]["loss"],
        "curve": curve,
    }
    return tower, heads, log


# ----------------------------------------------------------------------------- probe


def object_features(
    tower: Any, recipe: VisionRecipe, stream: str, n_scenes: int, batch: int = 50
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Frozen features of every object's centre patch in ``n_scenes`` scenes of ``stream``:
    ``(features [objects, d], labels per attribute [objects], object records)``."""
    import torch

    proc = image_processor(recipe)
    feats, objs = [], []
    with torch.inference_mode():
        for start in range(0, n_scenes, batch):
            pairs = draw_scenes(stream, recipe.seed, start, min(batch, n_scenes - start), recipe)
            pix = proc(images=[im for _, im in pairs], return_tensors="pt")["pixel_values"]
            f = features(tower, pix)
            for b, (scene, _) in enumerate(pairs):
                for o in scene["objects"]:
                    i, _, _ = centre_cell(o, scene["width"], scene["height"], recipe.grid)
                    feats.append(f[b, i])
                    objs.append(
                        {
                            "scene": start + b,
                            **{k: o[k] for k in ("color", "shape", "size", "x", "y")},
                        }
                    )
    x = torch.stack(feats).float()
    labels = {a: torch.tensor([names.index(o[a]) for o in objs]) for a, names in ATTRS.items()}
    return x, labels, objs


def fit_linear_probe(x: Any, y: Any, classes: int, l2: float = 1e-3, iters: int = 200) -> Any:
    """Multinomial logistic regression (full-batch L-BFGS) on standardized features;
    returns a function features -> predicted class ids."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: (((z - mu) / sd) @ w + b).argmax(-1)


def run_probe(tower: Any, recipe: VisionRecipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Linear probes of colour, shape, size (and a linear read-out of the position) from
    frozen centre-patch features, fitted on probe-train scenes and scored on probe-test
    scenes; returns (report, test predictions)."""
    x_tr, y_tr, tr_objs = object_features(tower, recipe, "probe-train", recipe.probe_train_scenes)
    x_te, y_te, objs = object_features(tower, recipe, "probe-test", recipe.probe_test_scenes)
    report: dict[str, Any] = {
        "train_objects": len(x_tr),
        "test_objects": len(x_te),
        "test_scenes": recipe.probe_test_scenes,
        "accuracy": {},
        "accuracy_by_size": {},
    }
    preds: dict[str, Any] = {"objects": objs}
    small = y_te["size"] == 0
    for a, names in ATTRS.items():
        predict = fit_linear_probe(x_tr, y_tr[a], len(names))
        p = predict(x_te)
        ok = (p == y_te[a]).float()
        report["accuracy"][a] = round(float(ok.mean()), 4)
        report["accuracy_by_size"][a] = {
            "small": round(float(ok[small].mean()), 4) if small.any() else None,
            "large": round(float(ok[~small].mean()), 4) if (~small).any() else None,
        }
        preds[a] = [names[int(i)] for i in p]
    report["position_err_px"] = position_probe(x_tr, objs_xy(tr_objs), x_te, objs_xy(objs))
    return report, preds


def objs_xy(objs: list[dict[str, Any]]) -> Any:
    """Object centres in scene pixels (x, y from the bottom), as a float tensor."""
    import torch

    return torch.tensor([[o["x"], o["y"]] for o in objs], dtype=torch.float32)


def position_probe(x_tr: Any, xy_tr: Any, x_te: Any, xy_te: Any) -> float:
    """Least-squares linear read-out of an object's centre from its patch feature: the mean
    absolute error on held-out scenes, in pixels of the 256 px scene (0 would be exact;
    guessing the image centre errs by about 64)."""
    import torch

    def design(x: Any) -> Any:
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)

    w = torch.linalg.lstsq(design(x_tr), xy_tr).solution
    return round(float((design(x_te) @ w - xy_te).abs().mean()), 2)


def probe_figure(
    recipe: VisionRecipe, report: dict[str, Any], preds: dict[str, Any], png: Path
) -> None:
    """Two panels: a held-out scene annotated with what the probe reads for each object, and
    the probe's accuracy per attribute and object size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = preds["objects"]
    scene_id = objs[0]["scene"]
    ((scene, img),) = draw_scenes("probe-test", recipe.seed, scene_id, 1, recipe)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1, 1.2]})
    ax0.imshow(img)
    ax0.set_axis_off()
    ax0.set_title("held-out scene: what the frozen features say", fontsize=9)
    for j, o in enumerate(objs):
        if o["scene"] != scene_id:
            continue
        said = (preds["size"][j], preds["color"][j], preds["shape"][j])
        right = said == (o["size"], o["color"], o["shape"])
        ax0.text(
            o["x"],
            scene["height"] - o["y"],
            " ".join(said),
            fontsize=7,
            ha="center",
            va="center",
            color="black" if right else "red",
            bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "edgecolor": "none"},
        )
    attrs = list(ATTRS)
    xs = range(len(attrs))
    for k, (size, colour) in enumerate((("small", "#8FB3D9"), ("large", "#2E5E8C"))):
        vals = [report["accuracy_by_size"][a][size] or 0 for a in attrs]
        ax1.bar(
            [x + (k - 0.5) * 0.38 for x in xs],
            vals,
            width=0.38,
            color=colour,
            label=f"{size} objects",
        )
        for x, v in zip(xs, vals, strict=True):
            ax1.text(x + (k - 0.5) * 0.38, v + 0.005, f"{100 * v:.0f}", ha="center", fontsize=7)
    ax1.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax1.set_xticks(list(xs), [f"{a}\n({100 * report['accuracy'][a]:.1f}% all)" for a in attrs])
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("linear-probe accuracy, held-out scenes")
    ax1.set_title(
        f"{report['test_objects']} objects in {report['test_scenes']} unseen scenes "
        f"({recipe.image_size} px, {recipe.grid}x{recipe.grid} patches)",
        fontsize=9,
    )
    ax1.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- cache


def _build_into(folder: Path, recipe: VisionRecipe, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file

    t0, cpu0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
    tower, heads, log = pretrain(recipe, progress)
    t_probe = time.time()
    report, preds = run_probe(tower, recipe)
    probe_s = time.time() - t_probe
    with quiet_transformers():  # no "Writing model shards" bar of its own
        tower.save_pretrained(folder)
    image_processor(recipe).save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in heads.state_dict().items()},
        str(folder / "heads.safetensors"),
    )
    report["probe_s"] = round(probe_s, 1)
    (folder / "probe.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    probe_figure(recipe, report, preds, folder / "probe.png")
    info = {
        "recipe": recipe.model_dump(),
        "key": recipe.key(),
        **log,
        "probe": report["accuracy"],
        "build_s": round(time.time() - t0, 1),
        # CPU seconds of this process, and the machine's load: a build on a busy machine
        # takes longer than its CPU time over the threads would say.
        "cpu_s": round(time.process_time() - cpu0, 1),
        "threads": torch.get_num_threads(),
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def build_vision_tower(
    recipe: VisionRecipe = DEFAULT_RECIPE, root: Path | None = None, progress: bool = True
) -> Path:
    """Pretrain (or reuse) the tower of ``recipe``; return its folder (``SiglipVisionModel``
    + image processor + ``probe.json``/``probe.png`` + ``pretrain.json``)."""
    key = recipe.key()
    folder = (root or cache_root()) / f"vision-{key}"
    if not is_complete(folder, key):
        atomic_fill(folder, key, lambda tmp: _build_into(tmp, recipe, progress))
    return folder


def load_tower(folder: Path) -> Any:
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(folder).eval()


def probe_report(folder: Path) -> dict[str, Any] | None:
    """The probe results stored with a built tower (None if it has none)."""
    return read_json(Path(folder) / "probe.json")


def main() -> None:
    import argparse
    import shutil

    ap = argparse.ArgumentParser(
        description="Build (or reuse) the pretrained tower; print its probe."
    )
    ap.add_argument("--figure", type=Path, help="copy the probe figure (PNG) here")
    args = ap.parse_args()
    folder = build_vision_tower()
    print(
        json.dumps(
            {"folder": str(folder), **json.loads((folder / "pretrain.json").read_text())}
            | {"probe": probe_report(folder)},
            indent=2,
        )[:4000]
    )
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / "probe.png", args.figure)


if __name__ == "__main__":
    main()
