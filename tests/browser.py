"""A headless Chromium driven over its DevTools protocol, for the view's browser tests and
bench (a websocket client and Debian's ``chromium``; no selenium, no driver binary).

One page per browser; events (console errors, exceptions) are collected while commands
wait for their replies, so a test can ask for every error a page logged.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REQUIRE = "VPD_REQUIRE_BROWSER"  # set by .ci/run where chromium is installed: no skipping


def find_chromium() -> str | None:
    """The browser to run: $VPD_CHROMIUM, else the first of Debian's and others' names."""
    env = os.environ.get("VPD_CHROMIUM")
    if env:
        return shutil.which(env)  # a path or a name; None where it is not an executable
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def unavailable() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return "chromium is not installed (Debian: apt-get install chromium; or set $VPD_CHROMIUM)"
    return None


class BrowserError(RuntimeError):
    pass


class Chromium:
    """``with Chromium() as b: b.goto(url); b.eval("1 + 1")``."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30.0) -> None:
        import websocket

        exe = find_chromium()
        if exe is None:
            raise BrowserError("chromium is not installed")
        self.timeout = timeout
        self.tmp = Path(tempfile.mkdtemp(prefix="vpd-chromium-"))
        self.downloads = self.tmp / "downloads"
        self.downloads.mkdir()
        profile = self.tmp / "profile"
        args = [
            exe,
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-port=0",
            "--remote-allow-origins=*",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                err = (
                    self.proc.stderr.read().decode(errors="replace")[-800:]
                    if self.proc.stderr
                    else ""
                )
                self.close()
                raise BrowserError(f"chromium exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.close()
                raise BrowserError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        base = f"http://127.0.0.1:{port}"
        targets = json.load(urllib.request.urlopen(f"{base}/json/list", timeout=timeout))
        page = next(t for t in targets if t.get("type") == "page")
        version = json.load(urllib.request.urlopen(f"{base}/json/version", timeout=timeout))
        self.ws = websocket.create_connection(
            page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
        )
        self.browser_ws = websocket.create_connection(
            version["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
        )
        self._id = 0
        self.events: list[dict[str, Any]] = []
        for method in ("Runtime.enable", "Page.enable", "Log.enable"):
            self.send(method)
        # Downloads (the ratings export) land in a folder the test reads.
        self.send(
            "Browser.setDownloadBehavior",
            {"behavior": "allow", "downloadPath": str(self.downloads), "eventsEnabled": True},
            browser=True,
        )

    # ---------------------------------------------------------------- protocol
    def send(self, method: str, params: dict[str, Any] | None = None, browser: bool = False) -> Any:
        ws = self.browser_ws if browser else self.ws
        self._id += 1
        mid = self._id
        ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise BrowserError(f"{method}: no reply in {self.timeout} s")

    def eval(self, expr: str) -> Any:
        """The value of a JS expression (promises awaited)."""
        res = self.send(
            "Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in res:
            det = res["exceptionDetails"]
            text = (det.get("exception") or {}).get("description") or det.get("text")
            raise BrowserError(f"JS error in {expr[:80]!r}: {text}")
        return res["result"].get("value")

    def wait_for(self, expr: str, timeout: float | None = None) -> Any:
        """Poll ``expr`` until truthy; an evaluation that fails while a page is being
        replaced (its context destroyed) is tried again."""
        deadline = time.monotonic() + (timeout or self.timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                val = self.eval(expr)
            except BrowserError as e:
                last, val = e, None
            if val:
                return val
            time.sleep(0.02)
        raise BrowserError(f"timed out waiting for {expr!r}" + (f" (last: {last})" if last else ""))

    def _load(self, method: str, params: dict[str, Any], ready: str) -> None:
        # Mark the old document, so a check that runs before the new one replaces it
        # cannot take the old page's readiness for the new one's.
        self.eval("window.__vpd_old = true")
        self.send(method, params)
        self.wait_for(f"!window.__vpd_old && document.readyState === 'complete' && ({ready})")

    def goto(self, url: str, ready: str = "window.VPD_READY === true") -> None:
        """Open ``url`` (another document, not a hash change) and wait until it is ready."""
        self._load("Page.navigate", {"url": url}, ready)

    def reload(self, ready: str = "window.VPD_READY === true") -> None:
        self._load("Page.reload", {"ignoreCache": True}, ready)

    def key(self, key: str) -> None:
        """Press one key (a character, or a name such as ArrowRight)."""
        codes = {"ArrowRight": 39, "ArrowLeft": 37, "ArrowDown": 40, "ArrowUp": 38}
        vk = codes.get(key, ord(key.upper()) if len(key) == 1 else 0)
        down: dict[str, Any] = {"type": "keyDown", "key": key, "windowsVirtualKeyCode": vk}
        if len(key) == 1:
            down["text"] = key
        self.send("Input.dispatchKeyEvent", down)
        self.send(
            "Input.dispatchKeyEvent", {"type": "keyUp", "key": key, "windowsVirtualKeyCode": vk}
        )

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page logged so far."""
        self.eval("0")  # drain pending events
        out = []
        for ev in self.events:
            m, p = ev["method"], ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(
                    "exception: "
                    + str((d.get("exception") or {}).get("description") or d.get("text"))
                )
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log: {e.get('text')} {e.get('url', '')}")
        return out

    def clear_events(self) -> None:
        self.eval("0")
        self.events.clear()

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.eval(
                "[document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
            )
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", params)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def wait_download(self, name: str, timeout: float = 15.0) -> Path:
        path = self.downloads / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and not (self.downloads / (name + ".crdownload")).exists():
                return path
            time.sleep(0.05)
        raise BrowserError(f"no download {name} in {timeout} s: {os.listdir(self.downloads)}")

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        for ws in (getattr(self, "ws", None), getattr(self, "browser_ws", None)):
            if ws is not None:
                try:
                    ws.close()
                except Exception:  # noqa: BLE001 - closing a dead socket
                    pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
