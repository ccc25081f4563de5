"""A scripted OpenAI-compatible HTTP server for tests and benchmarks (real HTTP, stdlib only).

``FakeOpenAIServer(script=[...])`` answers ``POST /v1/chat/completions`` and
``GET /v1/models`` on 127.0.0.1 (a free port). Each chat request takes the next action of
``script`` (then ``default``):

- ``"ok"``: a chat completion whose text comes from ``reply(messages, seed, i)``;
- ``"500"`` / ``"503"`` ...: that HTTP status;
- ``"429"`` or ``"429:S"``: rate limited with ``Retry-After: S`` (default 1);
- ``"hang"``: sleep ``hang_s`` before answering (longer than the client's timeout);
- ``"malformed"``: status 200 with a body that is not JSON;
- ``"nochoices"``: status 200, valid JSON but no ``choices``;
- ``"400"``: a non-retryable bad request.

``n_supported=False`` makes every request with ``n > 1`` fail with a 400 naming ``n``;
``max_n=1`` instead silently returns fewer choices (as some servers do).

Run standalone for manual checks: ``python tests/fake_openai_server.py --port 8000``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = Callable[[list[dict[str, Any]], int | None, int], str]


def program_reply(messages: list[dict[str, Any]], seed: int | None, i: int) -> str:
    """A ViperGPT program answering the last question in the prompt with simple_query."""
    user = messages[-1]["content"] if messages else ""
    text = user if isinstance(user, str) else json.dumps(user)
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
    q = last[0].replace('"', "'")[:80]
    return (
        "```python\ndef execute_command(image):\n"
        "    image_patch = ImagePatch(image)\n"
        f'    return image_patch.simple_query("{q}")  # seed={seed} i={i}\n```'
    )


class FakeOpenAIServer:
    def __init__(
        self,
        script: list[str] | None = None,
        default: str = "ok",
        reply: Reply = program_reply,
        latency_s: float = 0.0,
        hang_s: float = 5.0,
        n_supported: bool = True,
        max_n: int | None = None,
        model: str = "fake-model",
        port: int = 0,
    ) -> None:
        self.script = list(script or [])
        self.default = default
        self.reply = reply
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.n_supported = n_supported
        self.max_n = max_n
        self.model = model
        self.lock = threading.Lock()
        self.chat_hits = 0
        self.model_hits = 0
        self.requests: list[dict[str, Any]] = []  # chat request bodies, in arrival order
        self.actions: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being answered at once
        self._stop_hang = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                if self.path.rstrip("/").endswith("/models"):
                    with server.lock:
                        server.model_hits += 1
                    data = {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                    self._send(200, json.dumps(data).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                with server.lock:
                    server.chat_hits += 1
                    server.requests.append(body)
                    action = server.script.pop(0) if server.script else server.default
                    server.actions.append(action)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._respond(self, action, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _respond(self, h: Any, action: str, body: dict[str, Any]) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        code, _, arg = action.partition(":")
        if code == "hang":
            self._stop_hang.wait(self.hang_s)
            code = "ok"
        if code == "malformed":
            h._send(200, b'{"id": "x", "choices": [ {"message": ')
            return
        if code == "nochoices":
            h._send(200, json.dumps({"id": "x", "object": "chat.completion"}).encode())
            return
        if code == "429":
            err = {"error": {"message": "rate limited", "type": "rate_limit"}}
            h._send(429, json.dumps(err).encode(), {"Retry-After": arg or "1"})
            return
        if code.isdigit():
            err = {"error": {"message": f"scripted {code}", "type": "server_error"}}
            h._send(int(code), json.dumps(err).encode())
            return
        n = int(body.get("n") or 1)
        if n > 1 and not self.n_supported:
            err = {"error": {"message": "n > 1 is not supported; set n to 1", "param": "n"}}
            h._send(400, json.dumps(err).encode())
            return
        if self.max_n is not None:
            n = min(n, self.max_n)
        seed = body.get("seed")
        msgs = body.get("messages", [])
        choices = []
        ctoks = 0
        for i in range(n):
            text = self.reply(msgs, seed, i)
            for s in body.get("stop") or []:
                if s in text:
                    text = text[: text.index(s)]
            ctoks += len(text.split())
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            )
        ptoks = sum(len(str(m.get("content", "")).split()) for m in msgs)
        resp = {
            "id": f"chatcmpl-{self.chat_hits}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": choices,
            "usage": {
                "prompt_tokens": ptoks,
                "completion_tokens": ctoks,
                "total_tokens": ptoks + ctoks,
            },
        }
        h._send(200, json.dumps(resp).encode())

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop_hang.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--script", default="", help="comma-separated actions, e.g. 500,429:1,ok")
    ap.add_argument("--default", default="ok")
    ap.add_argument("--no-n", action="store_true", help="reject n > 1 with a 400")
    a = ap.parse_args()
    srv = FakeOpenAIServer(
        script=[s for s in a.script.split(",") if s],
        default=a.default,
        latency_s=a.latency,
        n_supported=not a.no_n,
        port=a.port,
    )
    print(srv.base_url, flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
