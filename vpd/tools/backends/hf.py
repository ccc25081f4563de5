"""``hf``: model-backed vision tools for real photographs, from Hugging Face checkpoints.

Each op is a transformers pipeline (or the model behind it), loaded on first use so a
program set that never asks for depth never loads a depth model:

- ``find`` / ``exists``: zero-shot object detection (OWLv2 by default) on the patch,
  boxes de-duplicated with non-maximum suppression (counting needs one box per object);
- ``best_text_match``: zero-shot image classification (CLIP); ``match_score``: CLIP's
  image-text cosine similarity;
- ``simple_query`` / ``verify_property`` (and ``best_text_match`` when ``vqa_ops`` names
  it): any image-text-to-text VLM (``vqa``), through the shared ``vlm`` tool mode
  (:mod:`vpd.tools.backends.vlm`: the same questions and answer prompt as the ``synthetic``
  backend's VLM mode and ``vpd sdvp``);
- ``compute_depth``: monocular depth (Depth Anything V2 by default), one map per image,
  memoized; these models predict relative *inverse* depth, so the region's median is
  inverted to keep the API's "smaller = closer" (``inverse_depth: false`` for a metric
  depth model).

Every model is an option (a hub id or a local folder), so a GPU recipe picks its own:
``execute.tools: {detector: ..., vqa: ..., device: cuda}``. Batches run as one pipeline
call per op; the tool server groups requests so they form.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vpd.errors import ToolsUnavailable
from vpd.llm.base import LLM
from vpd.tools.backends.base import Backend, ImageData, ToolError, each_item
from vpd.tools.backends.vlm import make_vlm
from vpd.tools.protocol import Box

DEFAULTS = {
    "detector": "google/owlv2-base-patch16-ensemble",
    "clip": "openai/clip-vit-large-patch14",
    "vqa": "Qwen/Qwen2-VL-2B-Instruct",
    "depth": "depth-anything/Depth-Anything-V2-Small-hf",
}
TASKS = {
    "detector": "zero-shot-object-detection",
    "clip": "zero-shot-image-classification",
    "depth": "depth-estimation",
}
# best_text_match stays CLIP unless vqa_ops names it (ViperGPT's choice of tools).
HF_VLM_OPS = "simple_query,verify_property"


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (boxes: N x 4, x0 y0 x1 y1)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        union = area[i] + area[rest] - inter
        overlap = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        order = rest[overlap <= iou]
    return keep


class HFBackend(Backend):
    """Vision tools backed by Hugging Face models (see the module docstring)."""

    name = "hf"

    def __init__(
        self,
        llm: LLM | None = None,
        *,
        detector: str = DEFAULTS["detector"],
        clip: str = DEFAULTS["clip"],
        vqa: str = DEFAULTS["vqa"],
        vqa_ops: str | list[str] = HF_VLM_OPS,
        vqa_view: str = "crop",
        depth: str = DEFAULTS["depth"],
        device: str = "auto",
        dtype: str = "auto",
        detect_threshold: float = 0.1,
        nms_iou: float = 0.3,
        max_new_tokens: int = 10,
        batch_size: int = 8,
        inverse_depth: bool = True,
    ) -> None:
        if not 0.0 <= detect_threshold <= 1.0:
            raise ToolError(f"detect_threshold must be in [0, 1], got {detect_threshold}")
        vlm = make_vlm(
            vqa,
            ops=vqa_ops,
            view=vqa_view,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        super().__init__(llm, vlm)
        self.models = {"detector": detector, "clip": clip, "vqa": vqa, "depth": depth}
        self.device = device
        self.dtype = dtype
        self.detect_threshold = detect_threshold
        self.nms_iou = nms_iou
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.inverse_depth = inverse_depth
        self._pipes: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading
    def _pipe(self, role: str) -> Any:
        if role not in self._pipes:
            import torch
            from transformers import pipeline

            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._pipes[role] = pipeline(
                    TASKS[role], model=self.models[role], device=device, dtype=self.dtype
                )
            except (OSError, ValueError) as e:
                # Not the program's fault: stop the stage rather than fail every program.
                model = self.models[role]
                raise ToolsUnavailable(f"cannot load the {role} model {model!r}: {e}") from None
        return self._pipes[role]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _crop(image: ImageData, box: Box | None) -> tuple[Any, Box]:
        left, lower, right, upper = image.clip(box)
        if right - left < 1 or upper - lower < 1:
            raise ToolError("the image patch is empty")
        # PIL boxes are (left, top, right, bottom) with y from the top.
        crop = image.pil.crop((left, image.height - upper, right, image.height - lower))
        return crop, (left, lower, right, upper)

    def _boxes(self, found: list[dict[str, Any]], region: Box) -> list[Box]:
        left, lower, right, upper = region
        if not found:
            return []
        corners = ("xmin", "ymin", "xmax", "ymax")
        xyxy = np.array([[d["box"][c] for c in corners] for d in found], dtype=np.float64)
        w, h = right - left, upper - lower
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, w)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, h)
        scores = np.array([float(d["score"]) for d in found])
        out: list[Box] = []
        for i in nms(xyxy, scores, self.nms_iou):
            x0, y0, x1, y1 = (int(round(v)) for v in xyxy[i])
            if x1 <= x0 or y1 <= y0:
                continue
            # Back to ViperGPT coordinates: absolute pixels, y from the image bottom.
            out.append((left + x0, upper - y1, left + x1, upper - y0))
        return out

    # ------------------------------------------------------------------ single items
    # detect is a batch of one: one code path per op. answer / verify_property are the VLM's.
    def detect(self, image: ImageData, box: Box | None, name: str) -> list[Box]:
        return _raise(self.detect_batch([(image, box, name)])[0])

    def answer(self, image: ImageData, box: Box | None, question: str) -> str:
        return self.ask_vlm("simple_query", image, box, {"question": question})

    def verify_property(self, image: ImageData, box: Box | None, name: str, prop: str) -> bool:
        return self.ask_vlm("verify_property", image, box, {"name": name, "prop": prop})

    def best_text_match(self, image: ImageData, box: Box | None, options: list[str]) -> str:
        # Each item has its own labels, so the base class's per-item loop is the batch.
        opts = [_text(o, "option") for o in options] if isinstance(options, list) else []
        if not opts:
            raise ToolError("best_text_match needs a non-empty list of strings")
        crop, _ = self._crop(image, box)
        ranked = self._pipe("clip")(crop, candidate_labels=opts)
        return str(ranked[0]["label"])

    def match_score(self, image: ImageData, box: Box | None, text: str) -> float:
        import torch

        crop, _ = self._crop(image, box)
        pipe = self._pipe("clip")
        model = pipe.model
        pix = pipe.image_processor(images=crop, return_tensors="pt")["pixel_values"]
        txt = pipe.tokenizer([text], padding=True, return_tensors="pt")
        with torch.no_grad():
            img_emb = model.get_image_features(pixel_values=pix.to(model.device, model.dtype))
            txt_emb = model.get_text_features(**{k: v.to(model.device) for k, v in txt.items()})
        img_emb = _pooled(img_emb)
        txt_emb = _pooled(txt_emb)
        return float(torch.nn.functional.cosine_similarity(img_emb, txt_emb).item())

    def depth(self, image: ImageData, box: Box | None) -> float:
        inv = image.memo.get("hf_depth")
        if inv is None:
            out = self._pipe("depth")(image.pil)
            inv = np.asarray(out["predicted_depth"].float().cpu().numpy(), dtype=np.float64)
            if inv.shape != (image.height, image.width):
                from PIL import Image

                inv = np.asarray(
                    Image.fromarray(inv.astype(np.float32)).resize(
                        (image.width, image.height), Image.BILINEAR
                    ),
                    dtype=np.float64,
                )
            image.memo["hf_depth"] = inv
        rows, cols = image.rows_cols(box)
        region = inv[rows, cols]
        if region.size == 0:
            raise ToolError("the image patch is empty")
        med = float(np.median(region))
        if not self.inverse_depth:  # a metric depth model: already "smaller = closer"
            return med
        return float(1.0 / max(med, 1e-6))

    # ------------------------------------------------------------------ batches
    def detect_batch(self, items: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
        def run(batch: list[tuple[ImageData, Box | None, str]]) -> list[Any]:
            crops = [self._crop(img, box) for img, box, _ in batch]
            inputs = [
                {"image": crop, "candidate_labels": [_text(name, "object name")]}
                for (crop, _), (_, _, name) in zip(crops, batch, strict=True)
            ]
            outs = self._pipe("detector")(
                inputs, threshold=self.detect_threshold, batch_size=self.batch_size
            )
            return [self._boxes(o, reg) for o, (_, reg) in zip(outs, crops, strict=True)]

        return _batched(run, items)

    def close(self) -> None:
        self._pipes.clear()
        super().close()


def _batched(run: Any, items: list[tuple]) -> list[Any]:
    """``run(items)`` as one model call; if any item breaks it, each item alone, so only
    the bad one fails (its exception in its place, as :func:`each_item` returns them)."""
    try:
        return run(items)
    except ToolsUnavailable:
        raise
    except Exception:  # noqa: BLE001 - retried per item below
        return each_item(lambda *it: run([it])[0], items)


def _raise(result: Any) -> Any:
    """A batch item's result, or its error raised (the single-item methods raise)."""
    if isinstance(result, Exception):
        raise result
    return result


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ToolError(f"{what} must be a non-empty string, got {type(v).__name__}")
    return v.strip()[:200]


def _pooled(emb: Any) -> Any:
    # transformers 5 may return a model output instead of the projected tensor.
    if hasattr(emb, "pooler_output"):
        return emb.pooler_output
    return emb
