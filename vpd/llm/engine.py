"""Continuous-batching decoding for Llama-family causal LMs, at the speed of the hardware.

What ``model.generate`` does not do for a sampling workload of many prompts that share a
long head (system prompt + API spec), each asked for ``n`` samples:

- The shared prefix is encoded ONCE and every row attends to that one copy (one matrix
  product over all rows per layer), never a copy per row.
- Each prompt's own part (few-shot examples + question) is encoded once into a slot and
  attended by its ``n`` rows as one group (rows ``slot * n + j``), again without copies.
- Continuous batching: a row stops at EOS, at a stop string in its GENERATED text, or at
  ``max_tokens``; as soon as rows finish, waiting prompts are admitted, so the batch stays
  full instead of waiting for its slowest row. Finished slots are compacted away, so the
  attention only covers slots in use, and the dense layers only rows still generating.
- Weights stay in the model's dtype (bfloat16 on CPUs with AMX / AVX512-BF16 multiplies
  ~3x faster than fp32); scores and softmax are fp32. In bfloat16 the decoding steps'
  dense layers run on weights packed once for oneDNN (same bits as the plain layers).
- Sampling is Gumbel-max with counter-based noise: the noise of a token is a hash of (the
  row's seed, the step, the token id), and only tokens that can still win are looked at
  (the hash's noise is bounded, so the candidate cut is exact, not a top-k cut).
- Reproducible whatever the batch: every kernel runs on fixed shapes (dense layers on
  ``max_rows`` rows padded, the merge on padded rows) or on shapes that do not change a
  row's bits (a segment's attention spans the longest live segment, rounded up to the
  kernel's 512-key block; the generated part its capacity), and matrix kernels give a
  row the same bits whatever its neighbours when the shape is the same. So with the
  same seed, ``max_rows`` and ``prefix_len`` (where the shared head ends, given by the
  caller as a function of the prompt alone) a sample is the same bits in a resumed run,
  in another order or beside other prompts (bfloat16 included).
  Another ``max_rows`` or head changes the arithmetic, and a rare near-tie between two
  tokens may then flip.

The layers are the model's own modules (norms, projections, MLP, rotary embedding): the
engine only replaces the attention bookkeeping and the scheduling. Architectures whose
decoder layer is not the Llama layout return a reason from :func:`unsupported` and the
caller falls back to ``model.generate``.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# Decoder layers laid out as LlamaDecoderLayer (pre-norm, q/k/v/o, gated MLP, RoPE).
SUPPORTED_TYPES = frozenset({"llama", "mistral", "qwen2"})
_M32 = 0xFFFFFFFF
# Noise from 32-bit uniforms in (0, 1) lies in [-log(-log(2^-33)), -log(-log(1 - 2^-33))]:
# a token more than this below the best (in logit / temperature) can never be drawn.
GUMBEL_SPAN = math.log(2.0**33) + math.log(math.log(2.0**33)) + 0.01
_ROW_PAD = 8  # dense layers run on (at least max_rows) rows rounded up to this
_SEG_N = 8  # a slot's samples attend its segment as a block padded to a multiple of this
_VOCAB_BLOCK = 128  # sampling scans the vocabulary in blocks of this many tokens
# A prompt segment's attention span (and the segment buffer) is a multiple of this: torch's
# CPU flash kernel works through keys in blocks of 512, and a block wholly past a row's
# keys adds exactly nothing, so a row's bits do not depend on how many such blocks follow.
# Within a block they can depend on its length (AVX512 without AMX: 208-368 keys round
# otherwise), so a span that varies with the neighbours must not cut a block short.
_KV_ALIGN = 512
# The generated part's span is its fixed capacity, max_tokens rounded up to this: a
# function of the call's options alone, so it needs no whole blocks.
_OWN_ALIGN = 32
# The own pass's queries per row are padded to a multiple of this: its float32 path gives
# odd query counts bits that depend on the batch size (AVX512 without AMX).
_Q_PAD = 8


def _align(n: int, to: int = _KV_ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return -(-n // to) * to


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
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        return f"the engine runs on CPU (model on {dev}; on GPUs use the vllm backend)"
    layer = inner.layers[0]
    need = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    mlp = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if not all(hasattr(layer, a) for a in need) or not all(hasattr(layer.mlp, a) for a in mlp):
        return "decoder layer is not laid out as Llama's"
    return None


def row_seed(seed: int | None, prompt: list[int]) -> int:
    """A row's 62-bit noise seed from its sample seed and its prompt (None: a random one)."""
    if seed is None:
        return random.SystemRandom().getrandbits(62)
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt))
    return int.from_bytes(h.digest(), "little") >> 2


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors, no overflow."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def gumbel_noise(seed: Any, step: Any, token: Any) -> Any:
    """Gumbel(0, 1) noise, a pure function of (seed, step, token) (int64 tensors, broadcast)."""
    import torch

    h = _mix32(seed & _M32)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (step & _M32))
    h = _mix32(h ^ (token & _M32))
    u = (h.to(torch.float64) + 0.5) / 2.0**32
    return -torch.log(-torch.log(u))


def sample_tokens(logits: Any, seeds: list[int], steps: list[int], temperature: float) -> list[int]:
    """One token per row from fp32 logits [rows, vocab]: Gumbel-max, exact.

    Row r draws with noise ``gumbel_noise(seeds[r], steps[r], token)``, so its token depends
    on its own logits, seed and step alone. Only tokens within the noise's span of the
    row's best can win, so only those get noise; ``temperature <= 0`` is greedy.
    """
    import torch

    if temperature <= 0:
        return logits.argmax(-1).tolist()
    dev = logits.device
    # The cut in logit units, a little looser than GUMBEL_SPAN (rounding of the division):
    # the extra tokens cannot win, and only the candidates are divided, not the vocab.
    rows, vocab = logits.shape
    if vocab % _VOCAB_BLOCK == 0:
        # Blocks of the vocabulary first: only blocks whose max passes the cut are scanned
        # token by token (a scan of the whole [rows, vocab] mask was ~5% of a decode step).
        # The same candidates, in the same (row, token) order.
        blocks = logits.view(rows, vocab // _VOCAB_BLOCK, _VOCAB_BLOCK)
        bmax = blocks.amax(-1)
        cut = bmax.amax(-1, keepdim=True) - (GUMBEL_SPAN + 0.01) * temperature
        rb, bb = (bmax >= cut).nonzero(as_tuple=True)
        ci, cj = (blocks[rb, bb] >= cut[rb]).nonzero(as_tuple=True)
        r_idx, t_idx = rb[ci], bb[ci] * _VOCAB_BLOCK + cj
    else:
        cut = logits.amax(-1, keepdim=True) - (GUMBEL_SPAN + 0.01) * temperature
        r_idx, t_idx = (logits >= cut).nonzero(as_tuple=True)
    seed_t = torch.tensor(seeds, dtype=torch.int64, device=dev)
    step_t = torch.tensor(steps, dtype=torch.int64, device=dev)
    scaled = logits[r_idx, t_idx] / temperature
    vals = scaled.double() + gumbel_noise(seed_t[r_idx], step_t[r_idx], t_idx)
    best = torch.full((len(seeds),), -math.inf, dtype=torch.float64, device=dev)
    best.scatter_reduce_(0, r_idx, vals, "amax")
    win = vals == best[r_idx]
    out = torch.zeros(len(seeds), dtype=torch.int64, device=dev)
    out[r_idx[win]] = t_idx[win]
    return out.tolist()


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
    seed: int
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Slot:
    conv: int
    seg_len: int
    started: float
    rows: list[_Row]


class _Buffers:
    """KV of the slots in use: prompt segments and generated tokens, kept compact."""

    def __init__(self, eng: Engine, n_slots: int, n: int, seg_cap: int, t_cap: int) -> None:
        torch = eng.torch
        # [layer, slot or row, kv head, position, head dim]: the flash kernel's batch layout.
        shape = (len(eng.layers), n_slots, eng.n_kv, max(1, seg_cap), eng.head_dim)
        own = (len(eng.layers), n_slots * n, eng.n_kv, max(1, t_cap), eng.head_dim)
        kw = {"dtype": eng.dtype, "device": eng.device}
        self.seg_k, self.seg_v = torch.zeros(shape, **kw), torch.zeros(shape, **kw)
        self.own_k, self.own_v = torch.zeros(own, **kw), torch.zeros(own, **kw)
        self.n = n
        self.slots: list[_Slot] = []  # slot i lives at index i of the buffers

    def free(self, i: int) -> None:
        """Drop slot ``i``; the last slot moves into its place (one copy, not a gap)."""
        last = len(self.slots) - 1
        if i != last:
            n = self.n
            self.seg_k[:, i] = self.seg_k[:, last]
            self.seg_v[:, i] = self.seg_v[:, last]
            self.own_k[:, i * n : (i + 1) * n] = self.own_k[:, last * n : (last + 1) * n]
            self.own_v[:, i * n : (i + 1) * n] = self.own_v[:, last * n : (last + 1) * n]
            self.slots[i] = self.slots[last]
        self.slots.pop()


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
        # Rows the dense layers of a step run on (at least; see _ROW_PAD).
        self.dense_rows = -(-self.max_rows // _ROW_PAD) * _ROW_PAD
        cfg = model.config
        self.layers = list(model.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.q_per_kv = self.n_heads // self.n_kv
        self.scale = float(attn.scaling)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self._packed = self._pack()
        # Prefix KV cache: (token ids, [(K, V)] per layer, each [kv_heads, P, head_dim]).
        self._prefix: tuple[tuple[int, ...], list[tuple[Any, Any]]] | None = None

    # ------------------------------------------------------------------ layers

    def _pack(self) -> dict[Any, Any]:
        """The model's linear layers' weights prepacked for oneDNN, by layer (bfloat16 only).

        torch's plain bfloat16 linear re-lays its weight out on every call: a SmolLM2-135M
        layer's seven projections at 128 rows took 2.5 ms plain and 1.6 ms packed on a
        2-core AMX CPU. Packed once, a layer gives the same bits as the plain one for the
        same number of rows (checked here on each weight, else unused); not so for every
        row count (384 rows and up differ), so the encode keeps the plain layers.
        Float32 (no gain measured), or a torch without oneDNN: {} (the plain layers).
        """
        torch = self.torch
        ops = getattr(torch.ops, "mkldnn", None)
        if self.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
            return {}
        mods = [self.model.lm_head]
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            mods += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
            mods += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        rows = self.dense_rows
        packed: dict[Any, Any] = {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        try:
            with torch.inference_mode():
                for mod in mods:
                    w = ops._reorder_linear_weight(mod.weight, rows)
                    x = torch.randn(rows, mod.in_features, generator=gen, device=self.device)
                    x = x.to(self.dtype)
                    if not torch.equal(
                        ops._linear_pointwise(x, w, mod.bias, "none", [], ""), mod(x)
                    ):
                        return {}
                    packed[mod] = w
        except (AttributeError, RuntimeError):
            return {}
        return packed

    def _lin(self, mod: Any, x: Any) -> Any:
        """``mod(x)`` for one of the model's linear layers, on its packed weight if any."""
        w = self._packed.get(mod)
        if w is None:
            return mod(x)
        return self.torch.ops.mkldnn._linear_pointwise(x, w, mod.bias, "none", [], "")

    def _mlp(self, mlp: Any, x: Any) -> Any:
        """The gated MLP (Llama's layout: down(act(gate(x)) * up(x))) on packed weights."""
        return self._lin(
            mlp.down_proj, mlp.act_fn(self._lin(mlp.gate_proj, x)) * self._lin(mlp.up_proj, x)
        )

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
        the last position. The tokens are padded to a multiple of 64 (the pads come after
        the real ones, so causal attention keeps them out of every real position).
        """
        torch = self.torch
        F = torch.nn.functional
        n = len(ids)
        m = -(-n // 64) * 64
        padded = torch.tensor(ids + [ids[-1]] * (m - n), device=self.device)
        x = self.model.model.embed_tokens(padded)
        pos = torch.arange(start, start + m, device=self.device)
        cos, sin = self._rope(x, pos)
        p = 0 if ctx is None else ctx[0][0].shape[1]
        mask = None
        if p:
            # Query i sees the whole prefix and its own tokens 0..i.
            see = torch.ones(m, p + m, dtype=torch.bool, device=self.device)
            see[:, p:] = torch.tril(see[:, p:])
            # As the additive mask SDPA would make of the boolean one on every layer (the
            # same values, so the same bits), made once.
            mask = torch.zeros(see.shape, dtype=self.dtype, device=self.device)
            mask = mask.masked_fill(~see, float("-inf"))
        kv: list[tuple[Any, Any]] = []
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rotate(a.q_proj(h).view(m, self.n_heads, self.head_dim), cos, sin)
            k = self._rotate(a.k_proj(h).view(m, self.n_kv, self.head_dim), cos, sin)
            v = a.v_proj(h).view(m, self.n_kv, self.head_dim)
            k, v = k.transpose(0, 1), v.transpose(0, 1)
            kv.append((k[:, :n].contiguous(), v[:, :n].contiguous()))
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
            x = x + a.o_proj(o[0].transpose(0, 1).reshape(m, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = self.model.model.norm(x[n - 1 : n])
        return kv, self.model.lm_head(last)[0].float()

    def _prefix_kv(self, prefix: list[int]) -> list[tuple[Any, Any]]:
        key = tuple(prefix)
        if self._prefix is None or self._prefix[0] != key:
            kv, _ = self._encode(prefix, 0, None)
            self._prefix = (key, kv)
        return self._prefix[1]

    # ------------------------------------------------------------------ generation

    def _split(self, prompts: list[list[int]]) -> int:
        """Length of the prefix every prompt shares (each keeps >= 1 own token)."""
        cached = self._prefix[0] if self._prefix is not None else ()
        k = len(cached)
        if k and all(len(p) > k and tuple(p[:k]) == cached for p in prompts):
            return k  # reuse the cached prefix across calls
        lcp = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            i = 0
            while i < lcp and p[i] == first[i]:
                i += 1
            lcp = i
        return max(0, lcp)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        seeds: list[int | None],
        temperature: float,
        max_tokens: int,
        stop: list[str],
        eos_ids: set[int],
        prefix_len: int | None = None,
    ) -> Iterator[RowResult]:
        """Yield every (prompt, sample) as soon as it finishes; ``seeds[j]`` is sample j's.

        ``prefix_len``: the head every prompt shares (e.g. the system message), encoded
        once. Give it for reproducible samples: where a prompt's head ends changes its
        arithmetic, so it must depend on the prompt alone. ``None`` takes the longest
        prefix the prompts of this call share, which depends on which prompts they are.

        The work runs under ``torch.inference_mode``, entered per step and left before
        each yield, so the caller's code never runs in it.
        """
        if not prompts:
            return
        if prefix_len is not None:
            head = prompts[0][:prefix_len]
            if prefix_len < 0 or any(
                len(p) <= prefix_len or p[:prefix_len] != head for p in prompts
            ):
                raise ValueError(
                    "prefix_len: every prompt must start with the same head and go on past it"
                )
        torch = self.torch
        with torch.inference_mode():
            run = _Call(
                self, prompts, max(1, n), seeds, temperature, max_tokens, stop, eos_ids, prefix_len
            )
        while run.pending or run.live:
            with torch.inference_mode():
                done = run.advance()
            yield from done

    def _step(
        self, live: list[tuple[int, _Row, _Slot]], pre: list[tuple[Any, Any]], buf: _Buffers,
        plen: int,
    ) -> Any:  # fmt: skip
        """One decoding step of the live rows; returns their next-token logits (fp32).

        Attention runs as three fused (flash) passes, over the shared prefix (live rows'
        queries against its one copy), the prompt segments (a slot's n rows against their
        segment) and the rows' own tokens; the passes are merged by their log-sum-exps.
        """
        torch = self.torch
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        dev = self.device
        n = buf.n
        n_slots = len(buf.slots)
        rows_cap = n_slots * n
        n_seg = -(-n // _SEG_N) * _SEG_N
        a_n = len(live)
        m = max(-(-a_n // _ROW_PAD) * _ROW_PAD, self.dense_rows)
        pad = [live[-1]] * (m - a_n)
        rows = torch.tensor([r for r, _, _ in live], device=dev)
        rows_m = torch.tensor([r for r, _, _ in live + pad], device=dev)
        # The token being fed is the row's last; its KV goes to own index len-1.
        t_idx = torch.tensor([len(row.tokens) - 1 for _, row, _ in live], device=dev)
        ids = torch.tensor([row.tokens[-1] for _, row, _ in live + pad], device=dev)
        pos = torch.tensor([plen + sl.seg_len + len(row.tokens) - 1 for _, row, sl in live + pad])
        # The segment pass runs over the longest live segment, rounded up to the flash
        # kernel's key block (_KV_ALIGN), not the buffer's capacity: a row gets the same
        # bits for any number of wholly masked blocks past its keys
        # (tests/test_llm_engine.py), so this saves work without changing a sample. The
        # own pass spans its fixed capacity.
        seg_lens = [sl.seg_len for sl in buf.slots]
        seg_len = torch.tensor(seg_lens, device=dev)
        t_cur = buf.own_k.shape[3]
        s_cur = min(buf.seg_k.shape[3], _align(max(seg_lens)))
        own_len = torch.zeros(rows_cap, dtype=torch.long, device=dev)
        own_len[rows] = t_idx + 1
        neg = float("-inf")
        zero = torch.zeros((), dtype=self.dtype, device=dev)
        seg_mask = zero.expand(n_slots, s_cur).masked_fill(
            torch.arange(s_cur, device=dev)[None] >= seg_len[:, None], neg
        )[:, None, None, :]  # [slot, 1, 1, S]
        own_mask = zero.expand(rows_cap, t_cur).masked_fill(
            torch.arange(t_cur, device=dev)[None] >= own_len[:, None], neg
        )[:, None, None, :]  # [row, 1, 1, T]
        p = pre[0][0].shape[1]
        kvh, g, d = self.n_kv, self.q_per_kv, self.head_dim

        x = self.model.model.embed_tokens(ids)
        cos, sin = self._rope(x, pos.to(dev))
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            qm = self._rotate(self._lin(a.q_proj, h).view(m, self.n_heads, d), cos, sin)
            q = qm[:a_n]
            k = self._rotate(self._lin(a.k_proj, h).view(m, kvh, d), cos, sin)[:a_n]
            v = self._lin(a.v_proj, h).view(m, kvh, d)[:a_n]
            own_k = buf.own_k[li, :rows_cap]
            own_v = buf.own_v[li, :rows_cap]
            own_k[rows, :, t_idx] = k
            own_v[rows, :, t_idx] = v
            q4 = q.view(a_n, kvh, g, d)
            qf = q4.new_zeros(rows_cap, kvh, g, d)
            qf[rows] = q4
            # Segment pass: [slot, kv head, queries, d] against the slot's segment, the n
            # samples' queries padded to a multiple of _SEG_N samples. A kernel's rounding
            # may depend on its shape, and n varies (a resumed question asks only for its
            # missing samples), so the shape must not.
            qs = qf.view(n_slots, n, kvh, g, d)
            if n_seg > n:
                qs = torch.cat([qs, qs.new_zeros(n_slots, n_seg - n, kvh, g, d)], 1)
            qs = qs.transpose(1, 2).reshape(n_slots, kvh, n_seg * g, d)
            o_s, l_s = flash(
                qs, buf.seg_k[li, :n_slots, :, :s_cur], buf.seg_v[li, :n_slots, :, :s_cur],
                attn_mask=seg_mask, scale=self.scale,
            )  # fmt: skip
            o_s = o_s.view(n_slots, kvh, n_seg, g, d)[:, :, :n].transpose(1, 2)
            o_s = o_s.reshape(rows_cap, kvh, g, d)
            l_s = l_s.view(n_slots, kvh, n_seg, g)[:, :, :n].transpose(1, 2)
            l_s = l_s.reshape(rows_cap, kvh, g)
            # Own pass: [row, kv head, g queries, d] against the row's generated tokens.
            g_own = -(-g // _Q_PAD) * _Q_PAD
            qo = qf if g_own == g else torch.cat([qf, qf.new_zeros(rows_cap, kvh, g_own - g, d)], 2)
            o_o, l_o = flash(
                qo, own_k[:, :, :t_cur], own_v[:, :, :t_cur], attn_mask=own_mask,
                scale=self.scale,
            )  # fmt: skip
            o_o, l_o = o_o[:, :, :g], l_o[:, :, :g]
            # Merged over all m (padded) rows: the same shapes whatever the rows in flight,
            # so no row's arithmetic depends on its neighbours.
            outs = [o_s[rows_m], o_o[rows_m]]
            lses = [l_s[rows_m], l_o[rows_m]]
            if p:
                # Prefix pass: every live row's queries as one long query block.
                kp, vp = pre[li]
                qp = qm.view(m, kvh, g, d).permute(1, 0, 2, 3).reshape(1, kvh, m * g, d)
                o_p, l_p = flash(qp, kp[None], vp[None], scale=self.scale)
                outs.append(o_p[0].view(kvh, m, g, d).transpose(0, 1))
                lses.append(l_p[0].view(kvh, m, g).transpose(0, 1))
            lse = torch.stack(lses)  # [parts, m, kvh, g]
            w = torch.softmax(lse, dim=0)[..., None]
            o = sum(wi * oi.float() for wi, oi in zip(w, outs, strict=True))
            o = o.to(self.dtype).reshape(m, self.n_heads * d)
            x = x + self._lin(a.o_proj, o)
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))
        return self._lin(self.model.lm_head, self.model.model.norm(x))[:a_n].float()


class _Call:
    """The state of one ``Engine.generate`` call: waiting prompts, slots, live rows."""

    def __init__(
        self, eng: Engine, prompts: list[list[int]], n: int, seeds: list[int | None],
        temperature: float, max_tokens: int, stop: list[str], eos_ids: set[int],
        prefix_len: int | None,
    ) -> None:  # fmt: skip
        self.eng, self.prompts, self.n, self.seeds = eng, prompts, n, seeds
        self.temperature, self.max_tokens, self.eos = temperature, max_tokens, eos_ids
        self.stop = [s for s in stop if s]
        # A stop string spans a few tokens at most: decode only a row's tail to look.
        self.tail = max(8, 2 * max((len(s) for s in self.stop), default=1))
        self.plen = eng._split(prompts) if prefix_len is None else prefix_len
        if self.plen:
            self.pre = eng._prefix_kv(prompts[0][: self.plen])
        else:
            kw = {"dtype": eng.dtype, "device": eng.device}
            empty = eng.torch.zeros(eng.n_kv, 0, eng.head_dim, **kw)
            self.pre = [(empty, empty)] * len(eng.layers)
        # Slots: enough for max_rows live rows, plus room for slots whose last rows drain.
        want = max(1, -(-eng.max_rows // n))
        self.n_slots = min(want + max(1, want // 2), len(prompts))
        seg_cap = _align(max(len(p) for p in prompts) - self.plen)
        self.buf = _Buffers(eng, self.n_slots, n, seg_cap, _align(max_tokens, _OWN_ALIGN))
        self.pending = deque(range(len(prompts)))
        self.live = 0

    def advance(self) -> list[RowResult]:
        """Admit what fits, decode one step; the rows that finished."""
        done: list[RowResult] = []
        self._admit(done)
        if not self.live:
            return done
        n, buf = self.n, self.buf
        rows = [
            (s * n + r.j, r, sl) for s, sl in enumerate(buf.slots) for r in sl.rows if not r.done
        ]
        logits = self.eng._step(rows, self.pre, buf, self.plen)
        toks = sample_tokens(
            logits, [r.seed for _, r, _ in rows], [len(r.tokens) for _, r, _ in rows],
            self.temperature,
        )  # fmt: skip
        for (_, row, slot), tok in zip(rows, toks, strict=True):
            self._accept(row, tok, slot, done)
        for s in range(len(buf.slots) - 1, -1, -1):
            if all(r.done for r in buf.slots[s].rows):
                buf.free(s)
        return done

    def _admit(self, done: list[RowResult]) -> None:
        """Admit waiting prompts while a slot is free and live rows stay under ``max_rows``:
        encode each one's segment, draw its rows' first tokens."""
        n, buf, eng = self.n, self.buf, self.eng
        while (
            self.pending and len(buf.slots) < self.n_slots and self.live + n <= max(eng.max_rows, n)
        ):
            c = self.pending.popleft()
            s = len(buf.slots)
            seg = self.prompts[c][self.plen :]
            kv, logits = eng._encode(seg, self.plen, self.pre if self.plen else None)
            for li, (k, v) in enumerate(kv):
                buf.seg_k[li, s, :, : len(seg)] = k
                buf.seg_v[li, s, :, : len(seg)] = v
            seeds = [row_seed(self.seeds[j] if j < len(self.seeds) else None, self.prompts[c])
                     for j in range(n)]  # fmt: skip
            slot = _Slot(c, len(seg), time.perf_counter(), [_Row(c, j, seeds[j]) for j in range(n)])
            buf.slots.append(slot)
            first = sample_tokens(logits.expand(n, -1), seeds, [0] * n, self.temperature)
            self.live += n
            for row, tok in zip(slot.rows, first, strict=True):
                self._accept(row, tok, slot, done)
            if all(r.done for r in slot.rows):
                buf.free(s)

    def _accept(self, row: _Row, token: int, slot: _Slot, done: list[RowResult]) -> None:
        """Append a sampled token to a live row; end the row on EOS, stop string or length."""
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            row.tokens.append(token)
            if self.stop:
                text = self.eng.tok.decode(row.tokens[-self.tail :], skip_special_tokens=True)
                reason = "stop" if any(s in text for s in self.stop) else None
            if reason is None and len(row.tokens) >= self.max_tokens:
                reason = "length"
        if reason is None:
            return
        row.done = True
        self.live -= 1
        done.append(
            RowResult(
                conv=row.conv,
                j=row.j,
                tokens=row.tokens,
                text=self.eng.tok.decode(row.tokens, skip_special_tokens=True),
                finish_reason=reason,
                prompt_tokens=len(self.prompts[row.conv]),
                latency_s=time.perf_counter() - slot.started,
            )  # fmt: skip
        )
