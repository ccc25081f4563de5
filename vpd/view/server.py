"""`vpd view --serve PORT`: the site over HTTP on this machine, and a sink for ratings.

Stdlib only (``http.server``). GET serves the site folder; ``POST /api/ratings`` takes one
rating (a JSON object, checked as :class:`vpd.view.ratings.Rating`) and appends it as a line
to the ratings JSONL, flushed at once so a killed server loses nothing it acknowledged;
``GET /api/ratings`` returns the ratings in force (the last per rationale and rater), which
the pages merge into the browser's own, so a rater can switch browsers.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from vpd.errors import VpdError
from vpd.view.ratings import parse_rating, read_ratings

MAX_BODY = 256 * 1024  # one rating with its rationale text; anything bigger is not one


class _Handler(SimpleHTTPRequestHandler):
    ratings: Path
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per image request drowns the one line that matters (the URL)

    def _reply(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?")[0] == "/api/ratings":
            with self.lock:
                have = self.ratings.is_file()
                recs = read_ratings([self.ratings]) if have else []
            self._reply(200, [r.model_dump() for r in recs])
            return
        super().do_GET()

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.split("?")[0] != "/api/ratings":
            self._reply(404, {"error": "POST only to /api/ratings"})
            return
        n = int(self.headers.get("Content-Length") or 0)
        if n <= 0 or n > MAX_BODY:
            self._reply(413 if n > MAX_BODY else 400, {"error": f"body of {n} bytes"})
            return
        try:
            rec = parse_rating(json.loads(self.rfile.read(n)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._reply(400, {"error": f"not JSON: {e}"})
            return
        except VpdError as e:
            self._reply(400, {"error": str(e)})
            return
        line = json.dumps(rec.model_dump(), ensure_ascii=False) + "\n"
        with self.lock, open(self.ratings, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        self._reply(200, {"ok": True, "id": rec.id})


def make_server(
    site: Path, port: int, ratings: Path, host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """A server of ``site`` on ``host:port`` (0: any free port) appending to ``ratings``."""
    site = Path(site)
    if not (site / "index.html").is_file():
        raise VpdError(f"{site} is not a vpd view site (no index.html); build it with `vpd view`")
    ratings = Path(ratings)
    ratings.parent.mkdir(parents=True, exist_ok=True)
    handler = type("Handler", (_Handler,), {"ratings": ratings, "lock": threading.Lock()})
    try:
        return ThreadingHTTPServer((host, port), partial(handler, directory=str(site)))
    except OSError as e:
        raise VpdError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
