"""`vpd serve`: picks an installed server, waits for /v1/models, prints the base URL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, run_vpd, vpd_argv
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


def _fake_vllm(folder: Path, body: str = "serve") -> Path:
    """A `vllm` stand-in on PATH: records its argv and pid, then ``body``: ``serve`` the
    fake OpenAI API on its --port, ``exit`` with code 3, or ``hang`` without answering."""
    exe = folder / "vllm"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.fake_openai_server import FakeOpenAIServer\n"
        f"here = {str(folder)!r}\n"
        "with open(os.path.join(here, 'vllm.json'), 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'pid': os.getpid()}, f)\n"
        f"body = {body!r}\n"
        "if body == 'exit':\n"
        "    sys.exit(3)\n"
        "if body == 'hang':\n"
        "    time.sleep(600)\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "FakeOpenAIServer(port=port, model=sys.argv[2]).httpd.serve_forever()\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _path_with(folder: Path) -> dict[str, str]:
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_serve_prefers_vllm_and_passes_model_host_port_and_args(
    tmp_path: Path, free_port: int
) -> None:
    _fake_vllm(tmp_path)
    _fake_llama_server(tmp_path)  # both installed: vLLM is the one for a GPU machine
    env = {**os.environ, **_path_with(tmp_path)}
    proc = subprocess.Popen(
        vpd_argv("serve", "--model", "org/coder-7b", "--port", str(free_port), "--timeout", "30",
                 "--arg=--tensor-parallel-size=2"),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{free_port}/v1"
        with urllib.request.urlopen(url + "/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == "org/coder-7b"
        ran = json.loads((tmp_path / "vllm.json").read_text())
        assert ran["argv"] == ["serve", "org/coder-7b", "--host", "127.0.0.1",
                               "--port", str(free_port), "--tensor-parallel-size=2"]  # fmt: skip
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "vllm is ready" in err
    assert not _alive(ran["pid"])  # the server went down with `vpd serve`


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its parent.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(
    ("body", "args", "message"),
    [
        ("serve", [], "vllm serve needs --model"),
        ("exit", ["--model", "m"], "the server exited with code 3 before it was ready"),
        ("hang", ["--model", "m", "--timeout", "2"], "/v1/models within 2 s"),
    ],
)
def test_vllm_failures_are_one_line_errors(
    tmp_path: Path, free_port: int, body: str, args: list[str], message: str
) -> None:
    _fake_vllm(tmp_path, body)
    r = run_vpd("serve", "--port", str(free_port), *args, timeout=60, env=_path_with(tmp_path))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""  # no URL for a server not up
    if body != "serve":  # it was started: nothing may be left running
        deadline = time.monotonic() + 10
        pid = json.loads((tmp_path / "vllm.json").read_text())["pid"]
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)


def test_nothing_installed_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(VpdError, match="no LLM server is installed"):
        server_command(None, "127.0.0.1", 8000)


def test_serve_starts_llama_server_and_prints_the_url(tmp_path: Path, free_port: int) -> None:
    _fake_llama_server(tmp_path)
    port = free_port
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        vpd_argv("serve", "--port", str(port), "--timeout", "30"),
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
