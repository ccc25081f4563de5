"""Local networking helpers: the one place that asks the OS for a free TCP port."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it).

    Another process may take it before the caller binds it; callers that start a server
    on it (DeepSpeed's rendezvous, test servers) hold it within a moment.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
