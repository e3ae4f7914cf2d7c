"""Control messages between the server's ranks: one JSON object per line over a local TCP
socket. JSON (never pickle) so that a rank can only ever receive data, not code."""
from __future__ import annotations

import json
import socket
import threading

MAX_LINE = 64 << 20  # a prompt's token ids in JSON stay far below this


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    msg = json.loads(line)
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ValueError("control message must be a JSON object with an 'op' string")
    return msg


class LineConn:
    """Blocking JSON-lines connection used by worker ranks (thread-safe sends)."""

    def __init__(self, sock: socket.socket):
        # Small messages (one token each) must leave at once: with Nagle's algorithm a send
        # waits for the previous one's ACK, which the peer may delay by up to 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._lock = threading.Lock()
        self._rfile = sock.makefile("rb")

    def send(self, msg: dict) -> None:
        data = encode(msg)
        with self._lock:
            self.sock.sendall(data)

    def recv(self):
        """The next message, or None at end of stream."""
        line = self._rfile.readline(MAX_LINE)
        if not line:
            return None
        return decode(line)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
