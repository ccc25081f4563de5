"""Framing for the worker <-> parent channel: 4-byte length + UTF-8 JSON.

JSON (never pickle) because the worker side is hostile: the parent must be able to
read whatever a compromised worker writes without executing anything. Frames are
size-capped on both sides.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MAX_FRAME = 4 * 1024 * 1024
_HDR = struct.Struct("<I")


class WireError(Exception):
    """A malformed, oversized or truncated frame."""


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise WireError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HDR.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def send(fd: int, msg: dict[str, Any]) -> None:
    write_all(fd, encode(msg))


def _read_exact(fd: int, n: int) -> bytes:
    parts = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise WireError("channel closed")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv(fd: int) -> dict[str, Any]:
    """Blocking read of one frame (worker side)."""
    (n,) = _HDR.unpack(_read_exact(fd, _HDR.size))
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return _decode(_read_exact(fd, n))


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(body.decode("utf-8"))
    # ValueError covers integers beyond int_max_str_digits: a hostile peer's bad frame.
    except ValueError as e:
        raise WireError(f"bad frame: {e}") from None
    if not isinstance(msg, dict):
        raise WireError("frame is not a JSON object")
    return msg


class FrameReader:
    """Incremental, non-blocking frame parser for the parent's event loop."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HDR.size:
            (n,) = _HDR.unpack_from(self._buf)
            if n > self._max:
                raise WireError(f"frame of {n} bytes exceeds {self._max}")
            if len(self._buf) < _HDR.size + n:
                break
            body = bytes(self._buf[_HDR.size : _HDR.size + n])
            del self._buf[: _HDR.size + n]
            try:
                out.append(_decode(body))
            except RecursionError:  # absurdly deep nesting from a hostile child
                raise WireError("frame nested too deeply") from None
        return out
