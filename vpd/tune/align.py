"""Stage-1 alignment of the tiny VLM on captions, and a probe of what it can describe.

Real VLMs are aligned on image captions before instruction tuning (LLaVA's stage 1: the
language model frozen, the connector trained to make it describe images). The tiny VLM gets
the same, on captions written from the scene graphs of scenes drawn from their own streams
(``vpd-vision/align...``; never a run's data, never a question or an answer):

    "4 shapes: a small red star at the top left, a large blue circle at the top right,
     a large green square in the center and a small yellow triangle at the bottom left."

Objects are listed left to right, each with its size, colour, shape and where it lies in a
3 x 3 grid of the image, after their number. :func:`caption_probe` asks the aligned model to
describe held-out scenes and scores what it says against their scene graphs: the number it
gives, and the objects it names (matched as multisets of size-colour-shape, with place).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vpd.data.synth import COLORS, SHAPES, SIZES
from vpd.hardware import cpu_has_bf16
from vpd.progress import progress_bar
from vpd.tune.vision import VisionRecipe, draw_scenes, image_xy, warmup_cosine

CAPTION_PROMPT = "Describe the image."
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COLS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")


class AlignRecipe(BaseModel):
    """Everything that decides the stage-1 alignment (hashed into the tiny VLM's key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Distinct scenes, each seen once: 800 take about 4 min on 2 cores (the LM's backward
    # pass, frozen as it is, costs most); 2400 took 11 min and read no better.
    captions: int = Field(800, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(10, ge=0)
    bf16: bool = True  # autocast where the CPU has bf16 dot products (else ignored)
    # The resampler's set loss (its pretrained heads, frozen) kept beside the caption loss:
    # trained on captions alone, the connector collapsed to nearly the same tokens for
    # every image (0.99 cosine between two images' latents), the easiest way to lower a
    # frozen LM's loss; with it the latents keep what the heads read.
    keep_weight: float = Field(1.0, ge=0)
    probe_scenes: int = Field(100, ge=1)
    seed: int = 0


def place(obj: dict[str, Any], width: int, height: int) -> str:
    """Where an object's centre lies in a 3 x 3 grid: "top left", "center", "bottom"..."""
    x, y = image_xy(obj, width, height)
    col, row = _COLS[min(int(x * 3), 2)], _ROWS[min(int(y * 3), 2)]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def _where(p: str) -> str:
    return "in the center" if p == "center" else f"at the {p}"


def caption(scene: dict[str, Any]) -> str:
    """The scene graph as one sentence: the number of objects, then each left to right."""
    objs = sorted(scene["objects"], key=lambda o: o["x"])
    w, h = scene["width"], scene["height"]
    parts = [f"a {o['size']} {o['color']} {o['shape']} {_where(place(o, w, h))}" for o in objs]
    n = len(objs)
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if n == 1 else "shapes"
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {noun}: {listed}.".capitalize()


_OBJ = re.compile(
    rf"\b({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    rf"(?: (?:at the|in the) ((?:top|bottom)(?: left| right)?|left|right|center))?"
)


def parse_caption(text: str) -> tuple[int | None, list[tuple[str, str, str, str | None]]]:
    """``(the number said first, [(size, colour, shape, place)])`` of a caption."""
    first = text.strip().lower().split(" ", 1)[0] if text.strip() else ""
    n = _NUMBERS.index(first) if first in _NUMBERS else int(first) if first.isdigit() else None
    return n, [m.groups() for m in _OBJ.finditer(text.lower())]


def score_caption(text: str, scene: dict[str, Any]) -> dict[str, Any]:
    """How a caption matches its scene graph: the count right or not, and the objects it
    names that are there (precision) / the scene's objects it names (recall), by
    size-colour-shape; ``placed``: named objects also put in the right place."""
    n, said = parse_caption(text)
    w, h = scene["width"], scene["height"]
    truth = Counter((o["size"], o["color"], o["shape"]) for o in scene["objects"])
    truth_placed = Counter(
        (o["size"], o["color"], o["shape"], place(o, w, h)) for o in scene["objects"]
    )
    got = Counter(s[:3] for s in said)
    got_placed = Counter(said)
    hit = sum((truth & got).values())
    return {
        "count_right": n == len(scene["objects"]),
        "said": sum(got.values()),
        "objects": sum(truth.values()),
        "hit": hit,
        "placed": sum((truth_placed & got_placed).values()),
    }


def caption_messages(text: str | None = None) -> list[dict[str, Any]]:
    """The chat of one caption example (without the answer when ``text`` is None)."""
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}
    ]
    if text is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return msgs


def align_on_captions(
    model: Any,
    processor: Any,
    vision: VisionRecipe,
    recipe: AlignRecipe,
    keep: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the connector (in place; the tower and the LM frozen) to make the LM say the
    captions of ``recipe.captions`` fresh scenes; returns the loss curve and timings.
    ``keep(latents [B, K, width], scenes) -> loss``: what the latents must still encode,
    added with ``recipe.keep_weight``.
    (Captions listing the objects in the order of the image tokens that hold them, by the
    resampler's heads, were tried: 1.15 after 50 steps, against 0.95 left to right.)"""
    import torch

    from vpd.tune.data import ChatEncoder, Collator
    from vpd.tune.loss import labelled_logits, weighted_rows_loss

    torch.manual_seed(recipe.seed)
    for name, p in model.named_parameters():
        p.requires_grad = ".connector." in f".{name}"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps = math.ceil(recipe.captions / recipe.batch_size)

    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, recipe.warmup, steps)
    )
    encoder = ChatEncoder(processor, max_length=1024)
    pad = Collator(processor.tokenizer.pad_token_id)
    bf16 = recipe.bf16 and cpu_has_bf16()
    curve = []
    t0 = time.time()
    model.train()
    with progress_bar("tiny VLM: aligning on captions", steps, "step", progress) as bar:
        for step in range(steps):
            n = min(recipe.batch_size, recipe.captions - step * recipe.batch_size)
            pairs = draw_scenes("align", recipe.seed, step * recipe.batch_size, n, vision)
            rows = [encoder.encode_image(caption_messages(caption(s)), im) for s, im in pairs]
            batch = pad(rows)
            labels = batch.pop("labels")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, target, _ = labelled_logits(model, batch, labels)
            loss = weighted_rows_loss(logits, target, torch.full((n,), 1.0 / n))
            kept = None
            if keep is not None and recipe.keep_weight:
                lat = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
                kept = keep(torch.stack(list(lat)).float(), [sc for sc, _ in pairs])
                loss = loss + recipe.keep_weight * kept
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            row = {"step": step, "loss": round(float(loss.detach()), 4)}
            if kept is not None:
                row["keep"] = round(float(kept.detach()), 4)
            curve.append(row)
            bar.advance()
    model.eval()
    for p in model.parameters():
        p.requires_grad = True
    return {"steps": steps, "train_s": round(time.time() - t0, 1), "bf16": bf16, "curve": curve}


def caption_probe(
    model: Any, processor: Any, vision: VisionRecipe, n: int, seed: int = 0, batch: int = 25
) -> dict[str, Any]:
    """Greedy captions of ``n`` held-out scenes (``align-probe`` stream), scored against
    their scene graphs: the share with the right count, object precision and recall, the
    share of named objects also put in the right place, and a few examples."""
    import torch

    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    totals = Counter()
    examples = []
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True)
    try:
        for start in range(0, n, batch):
            pairs = draw_scenes("align-probe", seed, start, min(batch, n - start), vision)
            inputs = processor(
                text=[prompt] * len(pairs),
                images=[[im] for _, im in pairs],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=120, do_sample=False)
            texts = tok.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for (scene, _), text in zip(pairs, texts, strict=True):
                s = score_caption(text, scene)
                totals.update({k: int(v) for k, v in s.items()})
                if len(examples) < 3:
                    examples.append({"said": text.strip(), "truth": caption(scene)})
    finally:
        tok.padding_side = side
    return {
        "scenes": n,
        "count_right": round(totals["count_right"] / n, 4),
        "object_precision": round(totals["hit"] / max(totals["said"], 1), 4),
        "object_recall": round(totals["hit"] / max(totals["objects"], 1), 4),
        "placed_right": round(totals["placed"] / max(totals["hit"], 1), 4),
        "examples": examples,
    }
