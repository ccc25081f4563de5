"""The continuous-batching engine against plain ``model.generate``, on tiny random models.

Greedy decoding in float32 must give exactly HF's tokens, whatever the rows in flight; sampled
decoding must return every (prompt, sample) once, replay with the same seeds and not depend
on the batch; stop strings, EOS and max_tokens end rows as ``generate`` would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vpd.hardware import cpu_has_bf16
from vpd.llm.engine import (
    GUMBEL_SPAN,
    Engine,
    gumbel_noise,
    row_seed,
    sample_tokens,
    unsupported,
)
from vpd.llm.local import smollm2_gguf


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def _tiny(kind: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024)  # fmt: skip
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if kind == "qwen2":  # random biases, so the bias path is exercised
        for layer in model.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.data.normal_(0, 0.5)
    return model


def _prompts(tok) -> list[list[int]]:
    head = tok("You write Python programs about images. " * 4)["input_ids"]
    tails = ["How many red circles?", "Is there a star left of the square?", "Color?", "x " * 9]
    return [head + tok(t)["input_ids"] for t in tails]


def _hf_greedy(model, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=sorted(eos) or None,
                             pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
    end = next((i for i, t in enumerate(out) if t in eos), None)
    return out if end is None else out[:end]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_greedy_equals_hf_generate_for_any_rows_in_flight(tok, kind: str, rows: int) -> None:
    model = _tiny(kind, len(tok))
    prompts = _prompts(tok)
    eng = Engine(model, tok, max_rows=rows)
    got = list(eng.generate(prompts, 2, [1, 2], 0.0, 12, [], set()))
    assert sorted((r.conv, r.j) for r in got) == [(c, j) for c in range(4) for j in range(2)]
    for r in got:
        assert r.tokens == _hf_greedy(model, prompts[r.conv], 12, set()), (r.conv, r.j)
        assert r.finish_reason == "length" and len(r.tokens) == 12
        assert r.prompt_tokens == len(prompts[r.conv])


def test_prompts_without_a_shared_prefix_and_a_reused_prefix(tok) -> None:
    model = _tiny("llama", len(tok), seed=1)
    a, b = tok("alpha beta gamma")["input_ids"], tok("zeta eta")["input_ids"]
    eng = Engine(model, tok, max_rows=4)
    got = {r.conv: r.tokens for r in eng.generate([a, b], 1, [0], 0.0, 6, [], set())}
    assert got == {0: _hf_greedy(model, a, 6, set()), 1: _hf_greedy(model, b, 6, set())}
    # A second call whose prompts start with the cached prefix reuses it, same answers.
    prompts = _prompts(tok)
    first = {r.conv: r.tokens for r in eng.generate(prompts, 1, [0], 0.0, 6, [], set())}
    again = {r.conv: r.tokens for r in eng.generate(prompts[1:], 1, [0], 0.0, 6, [], set())}
    assert all(again[i] == first[i + 1] for i in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_replays_and_does_not_depend_on_the_batch(tok, dtype) -> None:
    """Same seeds, same batch_size: each sample is the same whoever its neighbours are
    (the engine keeps every kernel's shapes fixed, so no row's arithmetic depends on them)."""
    model = _tiny("llama", len(tok), seed=2).to(dtype)
    prompts = _prompts(tok) + [_prompts(tok)[0] + tok(" and more words")["input_ids"]]

    def run(subset: list[int], seeds: list[int], rows: int = 6) -> dict:
        eng = Engine(model, tok, max_rows=rows)
        ps = [prompts[i] for i in subset]
        return {
            (subset[r.conv], r.j): r.tokens for r in eng.generate(ps, 3, seeds, 1.0, 10, [], set())
        }

    full = run([0, 1, 2, 3, 4], [7, 8, 9])
    assert len(full) == 15 and len({tuple(t) for t in full.values()}) > 8  # really sampled
    assert run([0, 1, 2, 3, 4], [7, 8, 9]) == full  # replays
    assert run([4, 3, 2, 1, 0], [7, 8, 9]) == full  # other neighbours, other slots
    alone = run([2], [7, 8, 9])  # as a resumed run would: without its neighbours
    assert alone == {k: v for k, v in full.items() if k[0] == 2}
    assert run([0, 1, 2, 3, 4], [17, 18, 19]) != full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_logits_are_the_same_bits_whatever_n_neighbours_and_order(tok, dtype) -> None:
    """The invariance itself, not just its tokens: every decoding step of a (prompt, seed)
    gives bit-identical logits whether it is sampled with n=3 beside other prompts, alone
    with n=1 (a resumed question asks only for its missing samples), or in another order.
    One kv head per query head: n=1 then means 1-row kernels, which round differently."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=1024)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    # A long own part beside short ones: attention spans the longest live segment and
    # generated part, so whether this prompt is in flight changes those spans (32 -> 96+
    # keys), and 40 tokens take the generated part from 32 to 64 keys.
    prompts = _prompts(tok) + [_prompts(tok)[0] + tok(" red blue" * 40)["input_ids"]]
    head = len(tok("You write Python programs about images. " * 4)["input_ids"])

    def logits(subset: list[int], seeds: list[int]) -> dict:
        eng = Engine(model, tok, max_rows=8)
        step, seen = eng._step, {}

        def spy(live, *a, **k):
            out = step(live, *a, **k)
            for (_, row, _), lg in zip(live, out, strict=True):
                seen[(subset[row.conv], row.seed, len(row.tokens))] = lg.clone()
            return out

        eng._step = spy
        ps = [prompts[i] for i in subset]
        list(eng.generate(ps, len(seeds), seeds, 1.0, 40, [], set(), prefix_len=head))
        return seen

    full = logits([0, 1, 2, 3, 4], [7, 8, 9])
    for subset, seeds in (([2], [8]), ([3, 1], [9, 7]), ([1, 0, 3, 2], [8])):
        part = logits(subset, seeds)
        assert part and all(torch.equal(v, full[key]) for key, v in part.items()), subset


def test_prepacked_weights_give_the_plain_layers_bits(tok) -> None:
    """bfloat16 runs the dense layers on weights packed once for oneDNN (faster on CPU);
    the samples are the plain layers' samples, bit for bit."""
    model = _tiny("qwen2", len(tok), seed=3).to(torch.bfloat16)  # biases too
    prompts = _prompts(tok)
    packed = Engine(model, tok, max_rows=8)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN: the engine runs the plain layers")
    if not cpu_has_bf16():
        # oneDNN's packed kernel then emulates bf16 and its bits differ: the engine's own
        # check must refuse it and run the plain layers.
        assert packed._packed == {}
        pytest.skip("this CPU has no AMX / AVX512-BF16: packing refused, as it must be")
    assert len(packed._packed) == 1 + 7 * len(model.model.layers)  # lm_head + 7 a layer
    plain = Engine(model, tok, max_rows=8)
    plain._packed = {}

    def run(eng: Engine) -> dict:
        return {
            (r.conv, r.j): r.tokens for r in eng.generate(prompts, 3, [1, 2, 3], 1.0, 24, [], set())
        }

    got = run(packed)
    assert len(got) == 12 and got == run(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_bits_ignore_masked_key_blocks_past_the_longest_row(dtype) -> None:
    """What the engine's shrinking attention spans rely on: torch's CPU flash kernel gives a
    row the same output and log-sum-exp bits for any key span that is a multiple of its
    512-key block and covers the row's unmasked keys (whole masked blocks add nothing), for
    a capacity that is not a multiple of 512 too. Spans that are multiples of 16 only do not
    have it on every CPU (AVX512 without AMX: 208-368 keys). If a torch upgrade breaks this,
    samples would depend on their neighbours."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = torch.Generator().manual_seed(0)
    b, cap = 6, 2048
    for q_len in (8, 24, 72):  # the engine's query blocks are multiples of 8
        q = torch.randn(b, 3, q_len, 64, generator=g).to(dtype)
        k = torch.randn(b, 3, cap, 64, generator=g).to(dtype)
        v = torch.randn(b, 3, cap, 64, generator=g).to(dtype)
        for hi in (5, 100, 300, 511, 512, 600, 1500):
            lens = torch.randint(max(1, hi - 90), hi + 1, (b,), generator=g)

            def attend(span: int, lens: torch.Tensor = lens, qkv: tuple = (q, k, v)) -> tuple:
                mask = torch.zeros(b, span, dtype=dtype).masked_fill(
                    torch.arange(span)[None] >= lens[:, None], float("-inf")
                )[:, None, None, :]
                q_, k_, v_ = qkv
                return flash(q_, k_[:, :, :span], v_[:, :, :span], attn_mask=mask, scale=0.125)[:2]

            ref = attend(cap)
            for span in [*range(-(-hi // 512) * 512, cap, 512), 1800]:
                if span >= hi:
                    out = attend(span)
                    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), (hi, span)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attention_bits_ignore_the_batch_size_for_query_blocks_of_8(dtype) -> None:
    """The own pass's batch is the rows in the buffers, which depends on the neighbours: the
    kernel must give a batch element the same bits whatever the batch size. It does for
    query counts that are multiples of 8, which is why the engine pads them (in float32,
    odd query counts do not have it on AVX512 without AMX)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    g = torch.Generator().manual_seed(1)
    for heads, q_len in ((1, 8), (3, 8), (3, 16)):
        q = torch.randn(40, heads, q_len, 64, generator=g).to(dtype)
        k = torch.randn(40, heads, 512, 64, generator=g).to(dtype)
        v = torch.randn(40, heads, 512, 64, generator=g).to(dtype)
        ref = flash(q, k, v, scale=0.125)
        for n in (1, 2, 3, 5, 16):
            out = flash(q[:n], k[:n], v[:n], scale=0.125)
            assert torch.equal(out[0], ref[0][:n]) and torch.equal(out[1], ref[1][:n]), (q_len, n)


@pytest.mark.parametrize("vocab", [3000, 3072])  # token by token; by 128-token blocks
def test_the_candidate_cut_draws_what_the_full_vocabulary_would(vocab: int) -> None:
    """Gumbel-max over the candidates equals Gumbel-max over every token, bit for bit."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, vocab, generator=g) * 4
    logits[:8, :50] = logits[:8, :1].clone()  # exact ties among the best tokens
    logits[9] = 0.5  # a flat row: every token is a candidate
    logits[10, 2999] = 40.0  # one token far ahead, in the last block
    seeds, steps = list(range(100, 164)), [i % 7 for i in range(64)]
    tokens = torch.arange(logits.shape[1])
    for temp in (0.2, 0.5, 1.0, 1.7):
        got = sample_tokens(logits, seeds, steps, temp)

        def full(r: int, temp: float = temp) -> int:
            noise = gumbel_noise(torch.tensor(seeds[r]), torch.tensor(steps[r]), tokens)
            return int(torch.argmax((logits[r] / temp).double() + noise))

        want = [full(r) for r in range(64)]
        assert got == want, temp


def test_prefix_len_must_be_shared_by_every_prompt(tok) -> None:
    eng = Engine(_tiny("llama", len(tok)), tok, max_rows=4)
    a, b = tok("alpha beta gamma")["input_ids"], tok("zeta eta")["input_ids"]
    with pytest.raises(ValueError, match="prefix_len"):
        list(eng.generate([a, b], 1, [0], 0.0, 4, [], set(), prefix_len=2))
    with pytest.raises(ValueError, match="prefix_len"):
        list(eng.generate([a], 1, [0], 0.0, 4, [], set(), prefix_len=len(a)))  # no own token


def test_stop_string_eos_and_length_end_rows(tok) -> None:
    model = _tiny("llama", len(tok), seed=3)
    prompt = _prompts(tok)[0]
    ref = _hf_greedy(model, prompt, 16, set())
    eng = Engine(model, tok, max_rows=8)
    # EOS: the 4th greedy token ends the row before it (not included).
    (r,) = eng.generate([prompt], 1, [0], 0.0, 16, [], {ref[3]} - set(ref[:3]))
    assert r.tokens == ref[:3] and r.finish_reason == "stop"
    # A stop string in the generated text ends the row right after the token completing it.
    text6 = tok.decode(ref[:6])
    stop = text6[-3:] if len(text6.strip()) >= 3 else text6
    (r,) = eng.generate([prompt], 1, [0], 0.0, 16, [stop], set())
    assert r.finish_reason == "stop" and stop in r.text
    assert stop not in tok.decode(r.tokens[:-1]) and len(r.tokens) <= 6
    (r,) = eng.generate([prompt], 1, [0], 0.0, 5, [], set())
    assert r.tokens == ref[:5] and r.finish_reason == "length"


def test_row_seed_depends_on_seed_and_prompt() -> None:
    assert row_seed(None, [1, 2]) != row_seed(None, [1, 2])  # unseeded: fresh randomness
    assert row_seed(3, [1, 2]) == row_seed(3, [1, 2])
    assert len({row_seed(3, [1, 2]), row_seed(4, [1, 2]), row_seed(3, [1, 3])}) == 3
    assert all(0 <= row_seed(s, [5]) < 2**62 for s in (0, -1, 2**40))


def test_gumbel_noise_is_a_pure_function_with_the_right_law() -> None:
    seed = torch.full((200_000,), 12345, dtype=torch.int64)
    tokens = torch.arange(200_000, dtype=torch.int64)
    g = gumbel_noise(seed, torch.zeros_like(seed), tokens)
    assert torch.equal(g, gumbel_noise(seed, torch.zeros_like(seed), tokens))
    assert not torch.equal(g, gumbel_noise(seed, torch.ones_like(seed), tokens))
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6; bounded span.
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - 1.6449) < 0.03
    assert g.max().item() - g.min().item() < GUMBEL_SPAN


def test_sampling_follows_the_softmax() -> None:
    """Draw frequencies match softmax(logits / T) (the candidate cut loses nothing)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    want = torch.softmax(logits[0] / 0.7, -1)
    got = sample_tokens(logits.expand(4000, -1), list(range(4000)), [0] * 4000, 0.7)
    freq = torch.bincount(torch.tensor(got), minlength=5).double() / 4000
    assert torch.allclose(freq, want.double(), atol=0.025), (freq, want)
    assert sample_tokens(logits, [1], [0], 0.0) == [0]
    # The same (seed, step) draws the same token whatever else is in the batch.
    alone = sample_tokens(logits[:1].clone(), [77], [3], 1.0)
    assert sample_tokens(torch.cat([logits.flip(-1), logits]), [5, 77], [0, 3], 1.0)[1:] == alone


def test_other_architectures_are_refused_with_a_reason(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert "gpt2" in (unsupported(model) or "")
    with pytest.raises(ValueError, match="cannot run this model"):
        Engine(model, None)
