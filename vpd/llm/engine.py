"""Continuous-batching decoding for Llama-family causal LMs, at the speed of the hardware.

What ``model.generate`` does not do for a sampling workload of many prompts that share a
long head (system prompt + API spec), each asked for ``n`` samples:

- The shared prefix is encoded ONCE and every row attends to that one copy (one matrix
  product over all rows per layer), never a copy per row.
- Each prompt's own part (few-shot examples + question) is encoded once and attended by
  its ``n`` rows as one group (rows ``slot * n + j``), again without copies.
- Continuous batching: rows are decoded together; a row stops at EOS, at a stop string in
  its GENERATED text, or at ``max_tokens``; as soon as rows finish, waiting prompts are
  admitted, so the batch stays full instead of waiting for its slowest row.
- Dense layers run only on rows still generating. Weights stay in the model's dtype
  (bfloat16 on CPUs with AMX / AVX512-BF16 is ~3x fp32's matmul throughput); scores and
  softmax are fp32.
- Every row samples with its own ``torch.Generator``, seeded from its sample seed and its
  prompt, so what a row draws never depends on which other rows share its batch.

The layers are the model's own modules (norms, projections, MLP, rotary embedding): the
engine only replaces the attention bookkeeping and the scheduling. Architectures whose
decoder layer is not the Llama layout return a reason from :func:`unsupported` and the
caller falls back to ``model.generate``.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Decoder layers laid out as LlamaDecoderLayer (pre-norm, q/k/v/o, gated MLP, RoPE).
SUPPORTED_TYPES = frozenset({"llama", "mistral", "qwen2"})


def unsupported(model: Any) -> str | None:
    """Why ``model`` cannot run on this engine, or None when it can."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model type {mtype!r} is not one of {sorted(SUPPORTED_TYPES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.model.layers / rotary_emb"
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    layer = inner.layers[0]
    need = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(layer, a) for a in need):
        return "decoder layer is not laid out as Llama's"
    return None


def row_seed(seed: int | None, prompt: list[int]) -> int | None:
    """A row's RNG seed from its sample seed and its prompt (None: not reproducible)."""
    if seed is None:
        return None
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt))
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class RowResult:
    """One finished sample."""

    conv: int  # index of its prompt in the call
    j: int  # its index among the prompt's n samples
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    latency_s: float  # admission of its prompt -> this row's end


@dataclass
class _Row:
    conv: int
    j: int
    gen: Any  # torch.Generator or None (unseeded)
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Slot:
    conv: int
    seg_len: int
    started: float
    rows: list[_Row]


class Engine:
    """Generates ``n`` samples for each of many prompts with continuous batching.

    ``max_rows``: rows decoded together (more rows use the cores better, up to the point
    where the attention over all rows costs more than the dense layers save).
    """

    def __init__(self, model: Any, tokenizer: Any, max_rows: int = 64) -> None:
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the decoding engine cannot run this model: {why}")
        import torch

        self.torch = torch
        self.model = model
        self.tok = tokenizer
        self.max_rows = max(1, int(max_rows))
        cfg = model.config
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.group = self.n_heads // self.n_kv
        self.scale = float(attn.scaling)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        # Prefix KV cache: (token ids, [(K, V)] per layer, each [kv_heads, P, head_dim]).
        self._prefix: tuple[tuple[int, ...], list[tuple[Any, Any]]] | None = None

    # ------------------------------------------------------------------ layers

    def _rope(self, x: Any, positions: Any) -> tuple[Any, Any]:
        """cos, sin for ``positions`` (1-D), each [len, head_dim]."""
        cos, sin = self.model.model.rotary_emb(x, positions[None])
        return cos[0], sin[0]

    def _rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        """RoPE on x [len, heads, head_dim] with cos/sin [len, head_dim] (HF's rotate_half)."""
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def _encode(
        self, ids: list[int], start: int, ctx: list[tuple[Any, Any]] | None
    ) -> tuple[list[tuple[Any, Any]], Any]:
        """Run ``ids`` (positions ``start``...) attending ``ctx`` (the prefix) and themselves.

        Returns their K/V per layer ([kv_heads, len, head_dim] each) and the logits (fp32) of
        the last position.
        """
        torch = self.torch
        F = torch.nn.functional
        n = len(ids)
        x = self.model.model.embed_tokens(torch.tensor(ids, device=self.device))
        pos = torch.arange(start, start + n, device=self.device)
        cos, sin = self._rope(x, pos)
        p = 0 if ctx is None else ctx[0][0].shape[1]
        if p:
            # Query i sees the whole prefix and its own tokens 0..i.
            mask = torch.ones(n, p + n, dtype=torch.bool, device=self.device)
            mask[:, p:] = torch.tril(mask[:, p:])
        kv: list[tuple[Any, Any]] = []
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rotate(a.q_proj(h).view(n, self.n_heads, self.head_dim), cos, sin)
            k = self._rotate(a.k_proj(h).view(n, self.n_kv, self.head_dim), cos, sin)
            v = a.v_proj(h).view(n, self.n_kv, self.head_dim)
            k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
            kv.append((k, v))
            if p:
                kk = torch.cat([ctx[li][0], k], dim=1)
                vv = torch.cat([ctx[li][1], v], dim=1)
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], kk[None], vv[None], attn_mask=mask,
                    scale=self.scale, enable_gqa=True,
                )  # fmt: skip
            else:
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                    scale=self.scale, enable_gqa=True,
                )  # fmt: skip
            x = x + a.o_proj(o[0].transpose(0, 1).reshape(n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = self.model.model.norm(x[-1:])
        return kv, self.model.lm_head(last)[0].float()

    def _prefix_kv(self, prefix: list[int]) -> list[tuple[Any, Any]]:
        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            kv, _ = self._encode(prefix, 0, None)
            self._prefix = (key, kv)
        return self._prefix[1]

    # ------------------------------------------------------------------ sampling

    def _sample(self, logits: Any, rows: list[_Row], temperature: float) -> list[int]:
        """One token per row from fp32 logits [rows, vocab].

        Gumbel-max (argmax of logits / T plus Gumbel noise from the row's own generator) is
        exactly sampling from softmax(logits / T), and unlike an inverse-CDF draw it does
        not turn last-bit differences of the logits (rows batched with other neighbours)
        into a different token unless two candidates nearly tie.
        """
        torch = self.torch
        if temperature <= 0:
            return logits.argmax(-1).tolist()
        vocab = logits.shape[-1]
        u = torch.stack(
            [torch.rand(vocab, generator=r.gen) if r.gen is not None else torch.rand(vocab)
             for r in rows]
        ).to(logits.device)  # fmt: skip
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20)))
        return (logits / temperature + gumbel).argmax(-1).tolist()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        temperature: float,
        max_tokens: int,
        stop: list[str],
        eos_ids: set[int],
    ) -> Iterator[RowResult]:
        """Yield every (prompt, sample) as soon as it finishes; ``seeds[j]`` is sample j's."""
        torch = self.torch
        if not prompts:
            return
        with torch.inference_mode():
            yield from self._generate(prompts, n, seeds, temperature, max_tokens, stop, eos_ids)

    def _split(self, prompts: list[list[int]]) -> int:
        """Length of the prefix every prompt shares (each keeps >= 1 own token)."""
        cached = self._prefix[0] if self._prefix is not None else ()
        if cached and all(
            len(p) > len(cached) and tuple(p[: len(cached)]) == cached for p in prompts
        ):
            return len(cached)  # reuse the cached prefix across calls
        lcp = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            i = 0
            while i < lcp and p[i] == first[i]:
                i += 1
            lcp = i
        return max(0, lcp)

    def _generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        temperature: float,
        max_tokens: int,
        stop: list[str],
        eos_ids: set[int],
    ) -> Iterator[RowResult]:
        torch = self.torch
        n = max(1, n)
        stop = [s for s in stop if s]
        tail = max(8, 2 * max((len(s) for s in stop), default=1))
        plen = self._split(prompts)
        if plen:
            pre = self._prefix_kv(prompts[0][:plen])
        else:
            empty = torch.zeros(self.n_kv, 0, self.head_dim, dtype=self.dtype, device=self.device)
            pre = [(empty, empty)] * len(self.layers)
        n_slots = max(1, -(-self.max_rows // n))  # ceil: rows are whole prompts' groups
        n_slots = min(n_slots + max(1, n_slots // 2), len(prompts))  # room for draining slots
        rows_cap = n_slots * n
        seg_cap = max(len(p) for p in prompts) - plen
        L = len(self.layers)
        kv_shape = (L, self.n_kv, n_slots, seg_cap, self.head_dim)
        seg_k = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        seg_v = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        own_shape = (L, self.n_kv, rows_cap, max(1, max_tokens), self.head_dim)
        own_k = torch.zeros(own_shape, dtype=self.dtype, device=self.device)
        own_v = torch.zeros(own_shape, dtype=self.dtype, device=self.device)
        seg_len = torch.zeros(rows_cap, dtype=torch.long, device=self.device)
        slots: list[_Slot | None] = [None] * n_slots
        pending = deque(range(len(prompts)))
        active = 0

        def finish(row: _Row, reason: str, slot: _Slot) -> RowResult:
            row.done = True
            text = self.tok.decode(row.tokens, skip_special_tokens=True)
            return RowResult(
                conv=row.conv, j=row.j, tokens=row.tokens, text=text, finish_reason=reason,
                prompt_tokens=len(prompts[row.conv]),
                latency_s=time.perf_counter() - slot.started,
            )  # fmt: skip

        def accept(row: _Row, token: int, slot: _Slot) -> RowResult | None:
            """Append a sampled token; the row's result if that ended it."""
            if token in eos_ids:
                return finish(row, "stop", slot)
            row.tokens.append(token)
            if stop:
                text = self.tok.decode(row.tokens[-tail:], skip_special_tokens=True)
                if any(s in text for s in stop):
                    return finish(row, "stop", slot)
            if len(row.tokens) >= max_tokens:
                return finish(row, "length", slot)
            return None

        while pending or active:
            # Admit prompts while there is room: a free slot and rows under the target.
            while pending and active + n <= max(self.max_rows, n):
                s = next((i for i, sl in enumerate(slots) if sl is None), None)
                if s is None:
                    break
                c = pending.popleft()
                seg = prompts[c][plen:]
                kv, logits = self._encode(seg, plen, pre if plen else None)
                for li, (k, v) in enumerate(kv):
                    seg_k[li, :, s, : len(seg)] = k
                    seg_v[li, :, s, : len(seg)] = v
                seg_len[s * n : (s + 1) * n] = len(seg)
                slot = _Slot(c, len(seg), time.perf_counter(), [])
                for j in range(n):
                    rs = row_seed(seeds[j] if j < len(seeds) else None, prompts[c])
                    gen = torch.Generator().manual_seed(rs) if rs is not None else None
                    slot.rows.append(_Row(c, j, gen))
                first = self._sample(logits.expand(n, -1), slot.rows, temperature)
                slots[s] = slot
                for row, tok in zip(slot.rows, first, strict=True):
                    res = accept(row, tok, slot)
                    if res is not None:
                        yield res
                    else:
                        active += 1
                if all(r.done for r in slot.rows):
                    slots[s] = None
            if not active:
                continue
            live = [
                (s * n + r.j, r, sl)
                for s, sl in enumerate(slots)
                if sl is not None
                for r in sl.rows
                if not r.done
            ]
            logits = self._step(
                live, pre, seg_k, seg_v, seg_len, own_k, own_v, plen, rows_cap, n_slots, n
            )
            toks = self._sample(logits, [r for _, r, _ in live], temperature)
            for (_, row, slot), tok in zip(live, toks, strict=True):
                res = accept(row, tok, slot)
                if res is not None:
                    active -= 1
                    yield res
            for s, sl in enumerate(slots):
                if sl is not None and all(r.done for r in sl.rows):
                    slots[s] = None

    def _step(
        self,
        live: list[tuple[int, _Row, _Slot]],
        pre: list[tuple[Any, Any]],
        seg_k: Any,
        seg_v: Any,
        seg_len: Any,
        own_k: Any,
        own_v: Any,
        plen: int,
        rows_cap: int,
        n_slots: int,
        n: int,
    ) -> Any:
        """One decoding step of the live rows; returns their next-token logits (fp32)."""
        torch = self.torch
        dev = self.device
        a_n = len(live)
        rows = torch.tensor([r for r, _, _ in live], device=dev)
        # The token being fed is the row's last; its KV goes to own index len-1.
        t_idx = torch.tensor([len(row.tokens) - 1 for _, row, _ in live], device=dev)
        ids = torch.tensor([row.tokens[-1] for _, row, _ in live], device=dev)
        pos = torch.tensor([plen + sl.seg_len + len(row.tokens) - 1 for _, row, sl in live])
        t_cur = int(t_idx.max()) + 1
        s_cur = int(seg_len.max())
        # Additive masks over [segment | own] for every row slot (idle slots see nothing).
        seg_mask = torch.full((rows_cap, s_cur), float("-inf"), device=dev)
        seg_mask[torch.arange(s_cur, device=dev)[None, :] < seg_len[:, None]] = 0.0
        own_len = torch.zeros(rows_cap, dtype=torch.long, device=dev)
        own_len[rows] = t_idx + 1
        own_mask = torch.full((rows_cap, t_cur), float("-inf"), device=dev)
        own_mask[torch.arange(t_cur, device=dev)[None, :] < own_len[:, None]] = 0.0
        mask = torch.cat([seg_mask, own_mask], dim=1)[None, :, None, :]  # [1, R, 1, S+T]
        p = pre[0][0].shape[1]
        kvh, g, d = self.n_kv, self.group, self.head_dim

        x = self.model.model.embed_tokens(ids)
        cos, sin = self._rope(x, pos.to(dev))
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rotate(a.q_proj(h).view(a_n, self.n_heads, d), cos, sin)
            k = self._rotate(a.k_proj(h).view(a_n, kvh, d), cos, sin)
            v = a.v_proj(h).view(a_n, kvh, d)
            own_k[li, :, rows, t_idx] = k.transpose(0, 1)
            own_v[li, :, rows, t_idx] = v.transpose(0, 1)
            qf = q.new_zeros(kvh, rows_cap, g, d)
            qf[:, rows] = q.view(a_n, kvh, g, d).transpose(0, 1)
            # Scores against the shared prefix (one product for all rows), the row's
            # prompt segment (grouped by slot: the n rows of a prompt share it) and its own.
            parts = []
            if p:
                kp, _ = pre[li]
                sp = torch.matmul(qf.view(kvh, rows_cap * g, d), kp.transpose(1, 2))
                parts.append(sp.view(kvh, rows_cap, g, p).float())
            qs = qf.view(kvh, n_slots, n * g, d)
            ss = torch.matmul(qs, seg_k[li, :, :, :s_cur].transpose(-1, -2))
            so = torch.matmul(qf, own_k[li, :, :, :t_cur].transpose(-1, -2))
            tail = torch.cat([ss.view(kvh, rows_cap, g, s_cur), so], dim=-1).float() + mask
            scores = torch.cat([*parts, tail], dim=-1) if parts else tail
            probs = torch.softmax(scores * self.scale, dim=-1).to(self.dtype)
            out = torch.matmul(
                probs[..., p : p + s_cur].reshape(kvh, n_slots, n * g, s_cur),
                seg_v[li, :, :, :s_cur],
            ).view(kvh, rows_cap, g, d)
            out = out + torch.matmul(probs[..., p + s_cur :], own_v[li, :, :, :t_cur])
            if p:
                _, vp = pre[li]
                pp = probs[..., :p].reshape(kvh, rows_cap * g, p)
                out = out + torch.matmul(pp, vp).view(kvh, rows_cap, g, d)
            o = out[:, rows].transpose(0, 1).reshape(a_n, self.n_heads * d)
            x = x + a.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.model.model.norm(x)).float()
