"""Loading any Hugging Face VLM and asking it short questions: shared by every part.

The low-level VLM piece that `vpd tune`, `vpd eval`, `vpd sdvp` and the tools' ``vlm``
mode (``--tool-opt vqa=PATH``) all use, so a model answers the same way everywhere:

- ``load_vlm`` / ``load_model``: any image-text-to-text model folder (LLaVA, Qwen2-VL,
  Idefics3/SmolVLM, PaliGemma, a ``vpd tune`` output: ``final/``, ``checkpoint-N/`` or a
  LoRA adapter) or hub id, with one-line errors for paths that hold none;
- ``Generator``: batched greedy generation with the model's own chat template and left
  padding (a batch that runs out of GPU memory is split, not lost);
- the VPD prompts (``ANSWER_SUFFIX``, ``RATIONALE_SUFFIX``) and ``clean_answer``, so the
  answer a tuned model was trained to give is read back the same way by every caller.

torch and transformers load only inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.progress import quiet_transformers
from vpd.store import read_json

# The two VPD tasks' instructions (``vpd rationalize`` writes them, `vpd eval` asks them).
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
RATIONALE_SUFFIX = "Explain the rationale to answer the question."

# PaliGemma's own layout: "<image>" + bos + prefix + "\n" + answer + eos (the processor adds
# bos and the newline); checkpoints ship no chat template, so vpd tune falls back to this.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


# ----------------------------------------------------------------------------- answers

ANSWER_LEAD = re.compile(
    r"^\s*(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+)?(?:short\s+)?answer\s*(?:is|:)\s*:?\s*",
    re.IGNORECASE,
)
EDGE_PUNCT = " \t\"'`*.,;:!?"


def clean_answer(text: str) -> str:
    """A short answer from raw generated text: first non-empty line, no lead-in, no edge
    punctuation ("So the answer is 3." -> "3"; "Yes, there is." -> "Yes, there is")."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = ANSWER_LEAD.sub("", line, count=1)
    return line.strip(EDGE_PUNCT)


# ----------------------------------------------------------------------------- loading


def torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise VpdError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return value


def resolve_model_dir(path_or_name: str | Path) -> str:
    """Map a ``vpd tune`` output folder to its ``final/`` model; other inputs pass through."""
    p = Path(path_or_name)
    if p.is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        if (p / "final" / "config.json").exists():
            return str(p / "final")
    return str(path_or_name)


# The parts of a processor whose video half transformers builds (and type-checks) even
# for images: Qwen2-VL, Qwen2.5-VL and others of that shape.
_IMAGE_TEXT_VIDEO = ["image_processor", "tokenizer", "video_processor"]


def image_only_processor_class(cls: type) -> type | None:
    """``cls`` without its video processor, or None for a processor of another shape.

    transformers constructs, and checks the class of, a Qwen2-VL processor's video half
    even when only images are asked; without torchvision it can do neither. The subclass's
    ``__init__`` takes no video processor, so transformers (which reads a processor's parts
    from that signature) neither loads nor checks one. It keeps ``cls``'s name, so what it
    saves is a standard ``cls`` folder, loadable anywhere by ``AutoProcessor``.
    """
    if cls.get_attributes() != _IMAGE_TEXT_VIDEO:
        return None

    def __init__(
        self: Any,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Positional, as these classes hand them on: the base pairs args with the parts
        # it reads from this signature, so the trailing None (video) is dropped.
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def _image_only_fallback(src: str, trust_remote_code: bool) -> type | None:
    """The image-only class of ``src``'s processor (by its model config), if it has one."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # no config.json (e.g. a processor-only folder): nothing to go on
    if type(config) not in PROCESSOR_MAPPING:
        return None
    return image_only_processor_class(PROCESSOR_MAPPING[type(config)])


def load_processor(path_or_name: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor`` of a model; a processor whose video half cannot be built (no
    torchvision, or a folder saved without one) is loaded without it, for images."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    src = resolve_model_dir(path_or_name)
    with quiet_transformers():  # e.g. "SiglipImageProcessor requires torchvision"
        try:
            return AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
        except (OSError, ImportError, AttributeError, TypeError, ValueError) as err:
            cls = _image_only_fallback(src, trust_remote_code)
            if cls is None:
                raise
            # Without torchvision, ask for the PIL image processor outright.
            backend = {} if is_torchvision_available() else {"backend": "pil"}
            try:
                return cls.from_pretrained(src, trust_remote_code=trust_remote_code, **backend)
            except Exception as fallback:
                # The fallback did not fit either: the original error, the fallback's as a note.
                err.add_note(f"loading it without its video processor failed too: {fallback}")
                raise err from None


def load_vlm(
    path_or_name: str | Path,
    dtype: Any = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` of an image-text-to-text model, in eval mode on ``device``.

    A LoRA adapter folder (``adapter_config.json``, e.g. a ``vpd tune --lora`` checkpoint)
    is loaded onto its base model and merged, so callers always get a plain model.
    """
    from transformers import AutoModelForImageTextToText

    src = resolve_model_dir(path_or_name)
    tdtype = torch_dtype(dtype)
    p = Path(src)
    if p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        from peft import PeftModel

        base_name = json.loads((p / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base_name:
            raise VpdError(f"{src}: adapter_config.json names no base model")
        with quiet_transformers():
            base = AutoModelForImageTextToText.from_pretrained(
                base_name, dtype=tdtype, trust_remote_code=trust_remote_code
            )
            model = PeftModel.from_pretrained(base, src).merge_and_unload()
        proc_src = src if (p / "tokenizer_config.json").exists() else base_name
        processor = load_processor(proc_src, trust_remote_code)
    else:
        with quiet_transformers():
            model = AutoModelForImageTextToText.from_pretrained(
                src, dtype=tdtype, trust_remote_code=trust_remote_code
            )
        processor = load_processor(src, trust_remote_code)
    return model.to(device).eval(), processor


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise VpdError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    return device


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not a local path: "runs/modle" (a typo, with runs/ present) is
    reported as not found at once instead of after the hub client's retries."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        return False
    return not Path(model.split("/")[0]).exists()


def model_digest(model: str) -> str:
    """A cheap fingerprint of a local model's files, so a model re-trained into the same
    folder does not resume predictions of the old one (config + head/tail of each
    weight file: reading whole multi-GB weights would cost more than the check is worth)."""
    path = Path(model)
    if not path.is_dir():
        return model  # a hub id: the name (and its revision cache) is the identity
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix not in (".json", ".safetensors", ".bin") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            if size > 1 << 17:
                fh.seek(size - (1 << 16))
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def load_model(
    model: str, dtype: str, device: str, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load (model, processor) with one-line errors for paths that hold no usable VLM."""
    src = resolve_model(model)
    try:
        return load_vlm(src, dtype, device, trust_remote_code=trust_remote_code)
    except VpdError:
        raise
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForImageTextToText" in str(e):
            mtype = model_type_of(Path(src))
            raise VpdError(
                f"{model} is not a vision-language model ({mtype or 'unknown type'}): "
                "AutoModelForImageTextToText cannot load it; this needs an image+text "
                "model (LLaVA, Qwen2-VL, PaliGemma, Idefics3/SmolVLM, or `vpd tune` output)"
            ) from None
        raise VpdError(f"cannot load model {model}: {first_line(e)}") from None
    except OSError as e:
        raise VpdError(f"cannot load model {model}: {first_line(e)}") from None


def resolve_model(model: str) -> str:
    """The folder (or hub id) to load; a `vpd tune` output folder means its final/ model.

    Raises a one-line error for paths that cannot hold a model, before any output exists.
    """
    path = Path(model)
    if not path.exists():
        if is_hub_id(model):
            return model
        raise VpdError(f"model not found: {model} (expected a folder saved in Hugging Face format)")
    if not path.is_dir():
        raise VpdError(f"model must be a folder in Hugging Face format, got a file: {model}")
    src = Path(resolve_model_dir(path))
    if not (src / "config.json").exists() and not (src / "adapter_config.json").exists():
        raise VpdError(
            f"{model} holds no config.json: not a Hugging Face model folder "
            "(for a `vpd tune` run, point at its final/ or checkpoint-N/ folder)"
        )
    return str(src)


def model_type_of(path: Path) -> str | None:
    cfg = read_json(path / "config.json")
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- generation


class Generator:
    """Batched greedy generation with a VLM's own chat template and left padding.

    A batch that runs out of GPU memory is split in halves (and later batches are kept
    at the size that fitted), so a too-large ``--batch-size`` slows a run, never kills it.
    """

    def __init__(self, model: Any, processor: Any, chat_template: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Left padding keeps every prompt's last token at the end, where generation starts.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt_format = "model"
        if chat_template is not None:
            processor.chat_template = chat_template
            self.prompt_format = "file"
        elif getattr(processor, "chat_template", None) is None:
            if getattr(model.config, "model_type", None) == "paligemma":
                # The layout `vpd tune` trains PaliGemma checkpoints (which ship none) with.
                processor.chat_template = PALIGEMMA_CHAT_TEMPLATE
                self.prompt_format = "paligemma"
            else:
                self.prompt_format = "plain"
        self.chat = self.prompt_format != "plain"
        self.image_token = getattr(processor, "image_token", None)
        if not self.chat and not self.image_token:
            raise VpdError(
                "the model's processor has no chat template and no image token, so the VPD "
                "prompt cannot be built; pass --chat-template FILE (a Jinja template with an "
                "image slot) or save one with the model (processor.chat_template)"
            )
        self.max_batch: int | None = None  # learned from out-of-memory splits
        self.oom_splits = 0

    def prompt(self, question: str, suffix: str) -> str:
        text = f"{question}\n{suffix}"
        if not self.chat:
            # A checkpoint with no template (and no --chat-template): image token + text.
            return f"{self.image_token}\n{text}\n"
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def generate(self, images: list[Any], prompts: list[str], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        while len(out) < len(prompts):
            # Re-read each time: an out-of-memory split inside shrinks it for the rest.
            step = self.max_batch or len(prompts)
            i = len(out)
            out += self._generate_or_split(
                images[i : i + step], prompts[i : i + step], max_new_tokens
            )
        return out

    def _generate_or_split(self, images: list[Any], prompts: list[str], n: int) -> list[str]:
        import torch

        try:
            return self._generate(images, prompts, n)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(prompts) == 1:
                raise VpdError(
                    "out of GPU memory on a single question; try --dtype bfloat16, fewer "
                    "--max-new-tokens, or a GPU with more memory"
                ) from None
            self.max_batch = len(prompts) // 2
            self.oom_splits += 1
            return self.generate(images, prompts, n)

    def _generate(self, images: list[Any], prompts: list[str], max_new_tokens: int) -> list[str]:
        import torch

        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)
