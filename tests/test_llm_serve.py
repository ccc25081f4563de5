"""`vpd serve`: picks an installed server, waits for /v1/models, prints the base URL."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO
from vpd.errors import VpdError
from vpd.llm.serve import server_command


def _fake_llama_server(folder: Path) -> Path:
    """A `llama-server` stand-in: serves the fake OpenAI API on the --port it is given."""
    exe = folder / "llama-server"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.fake_openai_server import FakeOpenAIServer\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "assert sys.argv[sys.argv.index('-m') + 1].endswith('.gguf')\n"
        "FakeOpenAIServer(port=port).httpd.serve_forever()\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_nothing_installed_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VpdError, match="no LLM server is installed"):
        server_command(None, "127.0.0.1", 8000)


def test_serve_starts_llama_server_and_prints_the_url(tmp_path: Path, free_port: int) -> None:
    _fake_llama_server(tmp_path)
    port = free_port
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpd.cli", "serve", "--port", str(port), "--timeout", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(line + "/models", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    with pytest.raises(OSError):  # the server went down with `vpd serve`
        urllib.request.urlopen(line + "/models", timeout=2)
