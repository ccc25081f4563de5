"""``vpd serve``: start an OpenAI-compatible LLM server and wait until it answers.

vLLM (``vllm serve MODEL``) when installed (GPU machines), else llama.cpp's server
(``llama-server`` binary, or ``python -m llama_cpp.server``) with the embedded SmolLM2
GGUF by default. Prints the base URL for ``vpd sample --backend openai --base-url URL``.
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from vpd.errors import VpdError
from vpd.llm.local import smollm2_gguf


@dataclass
class ServerCommand:
    kind: str  # vllm | llama-server | llama_cpp.server
    argv: list[str]


def server_command(
    model: str | None, host: str, port: int, extra: list[str] | None = None
) -> ServerCommand:
    """The command that serves ``model`` here, by what is installed; VpdError if nothing is."""
    extra = list(extra or [])
    vllm_bin = shutil.which("vllm")
    if vllm_bin or importlib.util.find_spec("vllm") is not None:
        if model is None:
            raise VpdError("vllm serve needs --model (a Hugging Face model id or local folder)")
        head = [vllm_bin] if vllm_bin else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        argv = head + ["serve", model, "--host", host, "--port", str(port)]
        return ServerCommand("vllm", argv + extra)
    gguf = model
    if gguf is None:
        gguf = str(smollm2_gguf())
    llama = shutil.which("llama-server")
    if llama:
        argv = [llama, "-m", gguf, "--host", host, "--port", str(port)]
        return ServerCommand("llama-server", argv + extra)
    if importlib.util.find_spec("llama_cpp") is not None:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf]
        argv += ["--host", host, "--port", str(port)]
        return ServerCommand("llama_cpp.server", argv + extra)
    raise VpdError(
        "no LLM server is installed: on a GPU machine `pip install vpd[vllm]` (then "
        "`vpd serve --model MODEL`), or install llama.cpp (`llama-server` on PATH, or "
        "`pip install 'llama-cpp-python[server]'`); or sample in-process with --backend local"
    )


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``GET base_url/models`` until it answers 200; VpdError on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    url = base_url.rstrip("/") + "/models"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VpdError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - our own URL
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise VpdError(f"the server did not answer {url} within {timeout_s:.0f} s")


def serve(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    timeout_s: float = 600.0,
    extra: list[str] | None = None,
    on_ready: object = None,
) -> int:
    """Run the server in the foreground; ``on_ready(base_url)`` is called once it answers."""
    cmd = server_command(model, host, port, extra)
    base_url = f"http://{host}:{port}/v1"
    proc = subprocess.Popen(cmd.argv)  # noqa: S603 - argv built above, no shell

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the cleanup below: never leave the server orphaned

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        wait_ready(base_url, proc, timeout_s)
        if callable(on_ready):
            on_ready(base_url, cmd)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


class ServeConfig(BaseModel):
    """Start an OpenAI-compatible LLM server (vLLM, else llama.cpp) and print its base URL."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Model to serve (vLLM: HF id/folder; llama.cpp: .gguf)."
    )
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port.")
    timeout: float = Field(600.0, gt=0, description="Seconds to wait for the server to be ready.")
    args: list[str] = Field(
        default_factory=list,
        description="Extra argument for the server (repeat).",
        json_schema_extra={"flag": "arg"},
    )


def run_serve(cfg: ServeConfig) -> int:
    """`vpd serve`: the server in the foreground; its base URL on stdout once it answers."""
    from vpd.progress import console

    def ready(url: str, cmd: object) -> None:
        console().print(f"{getattr(cmd, 'kind', 'server')} is ready (Ctrl-C stops it)")
        print(url, flush=True)  # stdout: the one thing scripts want

    rc = serve(cfg.model, cfg.host, cfg.port, cfg.timeout, cfg.args, on_ready=ready)
    if rc:
        raise VpdError(f"the server exited with code {rc}")
    return rc


def serve_line(cfg: ServeConfig, rc: int) -> str:
    return ""
