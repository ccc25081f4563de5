"""OpenAI-compatible chat backend (vLLM / llama.cpp / OpenAI servers) via ``openai.AsyncOpenAI``.

- several base URLs share the load: each request goes to the least-loaded server
  (fewest requests in flight; ties round-robin);
- bounded concurrency (one asyncio semaphore over all servers);
- our own retry policy (the client's is off: ``max_retries=0``): exponential backoff with
  full jitter on 429 / 5xx / timeouts / connection errors / malformed bodies, honouring
  ``Retry-After``, at most ``max_retries`` retries per request, then ``LLMUnavailable``;
- ``n > 1`` in one request when the server supports it; if it answers 400 on ``n`` or
  returns fewer choices, that server is marked and the missing samples are asked one per
  request with their own seeds.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vpd.errors import VpdError
from vpd.llm.base import Completion, GenParams, LLMUnavailable, Messages
from vpd.llm.config import LLMConfig

_RETRY_AFTER_CAP_S = 120.0  # a server asking for longer is treated as down
# How servers word "n > 1 is not supported" (vLLM greedy/beam, llama.cpp, proxies).
_N_ERROR = re.compile(r"\bn\b|choices?|n_samples|num_return", re.IGNORECASE)


@dataclass
class _Server:
    url: str
    client: Any  # openai.AsyncOpenAI
    in_flight: int = 0
    served: int = 0
    n_supported: bool | None = None  # None: not known yet


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class _NUnsupported(Exception):
    pass


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP dates are rare here)."""
    if headers is None:
        return None
    raw = headers.get("retry-after-ms")
    if raw is not None:
        try:
            return float(raw) / 1000.0
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _text_content(messages: Messages) -> Messages:
    """Messages as the server expects them (image parts are not used by program sampling)."""
    return [dict(m) for m in messages]


class OpenAILLM:
    """``LLM`` over one or more OpenAI-compatible servers."""

    def __init__(self, cfg: LLMConfig) -> None:
        try:
            import openai
        except ImportError:  # pragma: no cover - openai is a core dependency
            raise VpdError("the openai backend needs the `openai` package") from None
        self._openai = openai
        self.cfg = cfg
        self._loop = asyncio.new_event_loop()
        self._servers = [
            _Server(
                url,
                openai.AsyncOpenAI(
                    base_url=url,
                    api_key=cfg.resolved_api_key(),
                    max_retries=0,  # the retry policy is ours (bounded, jittered, Retry-After)
                    timeout=cfg.timeout_s,
                ),
            )
            for url in cfg.base_urls
        ]
        self._rr = 0
        self._rng = random.Random()  # jitter only; never affects what is generated
        self._sem: asyncio.Semaphore | None = None
        self._model = cfg.model
        self.name = cfg.model or "?"
        self._dead: str | None = None  # set once a request exhausted its retries
        self.requests = 0  # HTTP requests sent (retries included)
        self.retries = 0

    # ------------------------------------------------------------------ public

    def generate(self, batch: list[Messages], params: GenParams) -> list[list[Completion]]:
        out: list[list[Completion]] = [[] for _ in batch]
        for i, c in self.stream(batch, params):
            out[i].append(c)
        for comps in out:
            comps.sort(key=lambda c: c.index)
        return out

    def stream(self, batch: list[Messages], params: GenParams) -> Iterator[tuple[int, Completion]]:
        """Yield ``(conversation index, completion)`` as requests finish (any order)."""
        if not batch:
            return
        seeds = params.sample_seeds()
        self._dead = None
        self._run(self._ensure_model())
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        queue: asyncio.Queue = asyncio.Queue()

        async def one(i: int, msgs: Messages) -> None:
            try:
                async for c in self._conversation(msgs, params, seeds):
                    queue.put_nowait((i, c, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer below
                queue.put_nowait((i, None, e))
            finally:
                queue.put_nowait((i, None, StopIteration()))

        tasks = [self._loop.create_task(one(i, m)) for i, m in enumerate(batch)]
        live = len(tasks)
        try:
            while live:
                i, c, err = self._loop.run_until_complete(queue.get())
                if isinstance(err, StopIteration):
                    live -= 1
                elif err is not None:
                    raise err
                else:
                    yield i, c
        finally:
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        for s in self._servers:
            self._loop.run_until_complete(s.client.close())
        self._loop.close()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "per_server": {s.url: s.served for s in self._servers},
        }

    # ------------------------------------------------------------------ internals

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def _ensure_model(self) -> None:
        """Resolve ``model`` None to the first model the server lists (vLLM serves one)."""
        if self._model is not None:
            return

        async def list_models(server: _Server) -> str:
            page = await server.client.models.list()
            ids = [m.id for m in page.data]
            if not ids:
                raise _Retryable(f"{server.url}/models lists no models")
            return ids[0]

        self._model = await self._with_retries(list_models, what="GET /models")
        self.name = self._model

    def _pick(self) -> _Server:
        least = min(s.in_flight for s in self._servers)
        n = len(self._servers)
        for j in range(n):
            s = self._servers[(self._rr + j) % n]
            if s.in_flight == least:
                self._rr = (self._rr + j + 1) % n
                return s
        return self._servers[0]  # unreachable

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2**attempt))
        delay = self._rng.uniform(0.0, cap)  # full jitter: spreads retries of many clients
        if retry_after is not None:
            delay = max(delay, min(retry_after, _RETRY_AFTER_CAP_S))
        return delay

    async def _with_retries(self, call: Any, what: str) -> Any:
        """Run ``call(server)`` with bounded retries; raise ``LLMUnavailable`` when spent."""
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            if self._dead is not None:
                # Another request already gave up: do not keep hammering a dead server.
                raise LLMUnavailable(self._dead)
            server = self._pick()
            server.in_flight += 1
            self.requests += 1
            try:
                return await self._classify(call, server)
            except _Retryable as e:
                last = f"{server.url}: {e}"
                if attempt == self.cfg.max_retries:
                    break
                self.retries += 1
                delay = self._backoff(attempt, e.retry_after)
            finally:
                server.in_flight -= 1
                server.served += 1
            await asyncio.sleep(delay)
        self._dead = (
            f"LLM server unavailable: {what} failed {self.cfg.max_retries + 1} times "
            f"(last error: {last}); check --base-url and that the server is up"
        )
        raise LLMUnavailable(self._dead)

    async def _classify(self, call: Any, server: _Server) -> Any:
        """Map the client's exceptions to retry / give-up decisions."""
        oa = self._openai
        try:
            return await call(server)
        except (oa.APITimeoutError, oa.APIConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        except oa.APIStatusError as e:
            code = e.status_code
            if code == 429 or code >= 500 or code == 408:
                raise _Retryable(f"HTTP {code}", _retry_after(e.response.headers)) from None
            raise
        except (oa.APIResponseValidationError, ValueError, TypeError, KeyError) as e:
            # A 200 whose body is not a chat completion (torn proxy response, HTML page...).
            raise _Retryable(f"malformed response: {type(e).__name__}: {e}"[:300]) from None

    async def _request(
        self, msgs: Messages, params: GenParams, n: int, seed: int | None
    ) -> tuple[list[tuple[str, str | None]], int, int, float]:
        """One chat request: ([(text, finish_reason)], prompt_tokens, completion_tokens, s)."""

        async def call(server: _Server) -> Any:
            kwargs: dict[str, Any] = {
                "model": self._model,
                "messages": _text_content(msgs),
                "temperature": params.temperature,
                "max_tokens": params.max_tokens,
            }
            if n > 1:
                kwargs["n"] = n
            if seed is not None:
                kwargs["seed"] = seed
            if params.stop:
                kwargs["stop"] = params.stop[:4]  # the OpenAI API allows at most 4
            t0 = time.perf_counter()
            try:
                resp = await server.client.chat.completions.create(**kwargs)
            except self._openai.BadRequestError as e:
                if n > 1 and _N_ERROR.search(str(e)):
                    server.n_supported = False
                    raise _NUnsupported(str(e)) from None
                raise
            dt = time.perf_counter() - t0
            choices = getattr(resp, "choices", None)
            if not isinstance(choices, list) or not choices:
                raise ValueError("response has no choices")
            got = []
            for ch in sorted(choices, key=lambda c: getattr(c, "index", 0) or 0):
                text = ch.message.content if ch.message is not None else None
                if not isinstance(text, str):
                    raise ValueError("choice without message content")
                got.append((text, ch.finish_reason))
            usage = getattr(resp, "usage", None)
            pt = int(getattr(usage, "prompt_tokens", 0) or 0)
            ct = int(getattr(usage, "completion_tokens", 0) or 0)
            if n > 1:
                server.n_supported = len(got) >= n
            return got, pt, ct, dt

        return await self._with_retries(call, what="chat completion")

    async def _conversation(self, msgs: Messages, params: GenParams, seeds: list[int | None]):
        """All ``n`` completions of one conversation (one n-request, or one per sample)."""
        n = params.n
        todo = list(range(n))
        assert self._sem is not None
        if n > 1 and all(s.n_supported is not False for s in self._servers):
            try:
                async with self._sem:
                    got, pt, ct, dt = await self._request(msgs, params, n, seeds[0])
                share = ct // max(1, len(got))  # per-choice token counts are not reported
                for j, (text, fr) in enumerate(got[:n]):
                    # One request, one seed: choice j is sample j of that seeded request.
                    yield self._completion(text, fr, pt, share, dt, seeds[0], j)
                todo = todo[len(got) :]
            except _NUnsupported:
                pass
            except self._openai.APIStatusError as e:
                for j in todo:
                    yield _failed(e, seeds[j], j)
                return
        for j in todo:  # one request per sample, each with its own seed
            try:
                async with self._sem:
                    got, pt, ct, dt = await self._request(msgs, params, 1, seeds[j])
                text, fr = got[0]
                yield self._completion(text, fr, pt, ct, dt, seeds[j], j)
            except self._openai.APIStatusError as e:
                yield _failed(e, seeds[j], j)

    @staticmethod
    def _completion(
        text: str, fr: str | None, pt: int, ct: int, dt: float, seed: int | None, j: int
    ) -> Completion:
        return Completion(
            text=text,
            prompt_tokens=pt,
            completion_tokens=ct,
            latency_s=dt,
            seed=seed,
            finish_reason=fr,
            index=j,
        )


def _failed(e: Exception, seed: int | None, j: int) -> Completion:
    """A non-retryable client error (4xx): this sample fails, the run goes on."""
    code = getattr(e, "status_code", "?")
    msg = str(getattr(e, "message", e))[:300]
    return Completion(text="", seed=seed, index=j, error=f"HTTP {code}: {msg}")
