"""OpenAI-compatible backend against a real local HTTP server that misbehaves on script."""

from __future__ import annotations

import time

import pytest

from tests.fake_openai_server import FakeOpenAIServer
from vpd.errors import VpdError
from vpd.llm import GenParams, LLMConfig, make_llm
from vpd.llm.base import LLMUnavailable

MSGS = [{"role": "user", "content": "How many red circles are there?"}]


def _llm(*servers: FakeOpenAIServer, **kw):
    opts = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0} | kw
    return make_llm(LLMConfig(backend="openai", base_urls=[s.base_url for s in servers], **opts))


def test_retries_transient_errors_then_succeeds() -> None:
    with FakeOpenAIServer(script=["500", "503", "malformed", "nochoices", "429:0"]) as srv:
        llm = _llm(srv)
        out = llm.generate([MSGS], GenParams(n=2, temperature=0.5, seed=7))
        llm.close()
    assert [len(c) for c in out] == [2]
    assert srv.chat_hits == 6  # five failures, then one n=2 request
    assert all("def execute_command" in c.text for c in out[0])
    assert out[0][0].prompt_tokens > 0 and out[0][0].latency_s > 0
    assert llm.stats()["retries"] == 5


def test_retry_after_is_honoured() -> None:
    with FakeOpenAIServer(script=["429:0.6"]) as srv:
        llm = _llm(srv)
        t0 = time.perf_counter()
        llm.generate([MSGS], GenParams())
        llm.close()
    assert time.perf_counter() - t0 >= 0.6
    assert srv.chat_hits == 2


def test_retries_are_bounded_and_raise_a_user_error() -> None:
    with FakeOpenAIServer(default="500") as srv:
        llm = _llm(srv, model="m", max_retries=2)
        with pytest.raises(LLMUnavailable, match="failed 3 times"):
            llm.generate([MSGS], GenParams())
        llm.close()
    assert srv.chat_hits == 3


def test_connection_refused_is_bounded() -> None:
    llm = make_llm(
        LLMConfig(backend="openai", base_urls=["http://127.0.0.1:9/v1"], max_retries=1,
                  backoff_base_s=0.01)
    )  # fmt: skip
    with pytest.raises(LLMUnavailable, match="GET /models"):
        llm.generate([MSGS], GenParams())
    llm.close()


def test_a_hanging_request_times_out_and_is_retried() -> None:
    with FakeOpenAIServer(script=["hang"], hang_s=10) as srv:
        llm = _llm(srv, timeout_s=0.5)
        t0 = time.perf_counter()
        out = llm.generate([MSGS], GenParams())
        llm.close()
    assert out[0][0].text
    assert srv.chat_hits == 2 and time.perf_counter() - t0 < 5


def test_n_unsupported_falls_back_to_one_request_per_seed() -> None:
    with FakeOpenAIServer(n_supported=False) as srv:
        llm = _llm(srv)
        out = llm.generate([MSGS], GenParams(n=3, temperature=0.5, seeds=[10, 20, 30]))
        llm.generate([MSGS], GenParams(n=2, temperature=0.5, seed=0))  # remembered: no 400
        llm.close()
    assert [c.seed for c in out[0]] == [10, 20, 30]
    assert [c.index for c in out[0]] == [0, 1, 2]
    assert srv.chat_hits == 1 + 3 + 2
    assert [r.get("seed") for r in srv.requests[1:4]] == [10, 20, 30]


def test_fewer_choices_than_asked_are_completed_one_by_one() -> None:
    with FakeOpenAIServer(max_n=1) as srv:
        llm = _llm(srv)
        out = llm.generate([MSGS], GenParams(n=3, temperature=0.5, seeds=[1, 2, 3]))
        llm.close()
    assert len(out[0]) == 3 and [c.index for c in out[0]] == [0, 1, 2]
    assert srv.chat_hits == 3  # one n=3 request answered with 1 choice, then 2 singles


def test_client_errors_fail_the_sample_not_the_run() -> None:
    with FakeOpenAIServer(script=["400"]) as srv:
        llm = _llm(srv)
        out = llm.generate([MSGS, MSGS], GenParams())
        llm.close()
    errors = [c.error for comps in out for c in comps]
    assert sum(e is not None for e in errors) == 1 and "HTTP 400" in next(e for e in errors if e)
    assert srv.chat_hits == 2  # a 400 is not retried


def test_concurrency_is_bounded_and_servers_share_the_load() -> None:
    with FakeOpenAIServer(latency_s=0.1) as a, FakeOpenAIServer(latency_s=0.1) as b:
        llm = _llm(a, b, concurrency=3)
        out = llm.generate([MSGS] * 12, GenParams())
        llm.close()
    assert len(out) == 12 and a.chat_hits + b.chat_hits == 12
    assert a.chat_hits >= 4 and b.chat_hits >= 4  # least-loaded + round-robin spread
    assert a.max_in_flight + b.max_in_flight <= 3 + 1  # + at most one overlap at handover
    assert max(a.max_in_flight, b.max_in_flight) <= 3


def test_model_resolved_from_server_and_api_key_from_env(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAIServer(model="served-model") as srv:
        cfg = LLMConfig(backend="openai", base_urls=srv.base_url)
        assert cfg.resolved_api_key() == "sk-test"
        llm = make_llm(cfg)
        llm.generate([MSGS], GenParams(stop=["\n```"]))
        llm.close()
    assert llm.name == "served-model" and srv.model_hits == 1
    assert srv.requests[0]["model"] == "served-model" and srv.requests[0]["stop"] == ["\n```"]


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="http"):
        LLMConfig(backend="openai", base_urls=["localhost:8000"])
    with pytest.raises(ValueError):
        LLMConfig(backend="nope")


def test_vllm_backend_without_vllm_says_what_to_do() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here")
    with pytest.raises(VpdError, match=r"vllm is not installed; pip install vpd\[vllm\]"):
        make_llm(LLMConfig(backend="vllm", model="any"))


def test_vllm_backend_maps_one_chat_call_to_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for the vllm package (GPU-only): records the call, returns n outputs each.
    import sys
    import types

    calls: list[tuple] = []

    class SamplingParams:
        def __init__(self, **kw: object) -> None:
            self.kw = kw

    class Engine:
        def __init__(self, **kw: object) -> None:
            self.kw = kw

        def chat(self, batch, sp, use_tqdm=True):  # noqa: ANN001
            calls.append((batch, sp.kw, use_tqdm))
            return [
                types.SimpleNamespace(
                    prompt_token_ids=[1, 2, 3],
                    outputs=[
                        types.SimpleNamespace(
                            text=f"c{i}s{j}", token_ids=[7] * (j + 1), finish_reason="stop"
                        )
                        for j in range(sp.kw["n"])
                    ],
                )
                for i in range(len(batch))
            ]

    fake = types.SimpleNamespace(LLM=Engine, SamplingParams=SamplingParams)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    llm = make_llm(LLMConfig(backend="vllm", model="m"))
    assert llm.engine.kw["model"] == "m" and llm.engine.kw["enable_prefix_caching"] is True
    batch = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    out = llm.generate(batch, GenParams(n=3, temperature=0.5, max_tokens=9, stop=["x"], seed=4))
    assert len(calls) == 1 and calls[0][0] == batch and calls[0][2] is False
    assert calls[0][1] == {"n": 3, "temperature": 0.5, "max_tokens": 9, "stop": ["x"], "seed": 4}
    assert [[c.text for c in row] for row in out] == [
        ["c0s0", "c0s1", "c0s2"],
        ["c1s0", "c1s1", "c1s2"],
    ]
    assert [c.index for c in out[1]] == [0, 1, 2]
    assert [c.completion_tokens for c in out[0]] == [1, 2, 3]
    assert all(c.prompt_tokens == 3 and c.seed == 4 and c.finish_reason == "stop" for c in out[0])
