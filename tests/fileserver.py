"""A real HTTP file server for the download tests: http.server in a thread on a free loopback
port, with Range support and a few misbehaviours a model download must survive."""

from __future__ import annotations

import http.server
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

CHUNK = 64 * 1024


@dataclass
class Served:
    """What the server sends, how it misbehaves, and what it was asked."""

    body: bytes
    # "serve": the file, honouring Range; "reset_once": the first request sends the full
    # Content-Length but only half the body, then resets the connection (RST); "endless": a
    # 200 without Content-Length that never ends; "ignore_range": always a full 200.
    mode: str = "serve"
    requests: list[dict[str, Any]] = field(default_factory=list)
    resets: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    served: Served
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        served = self.served
        range_header = self.headers.get("Range")
        served.requests.append({"path": self.path, "range": range_header})
        body = served.body
        if served.mode == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            block = b"\0" * CHUNK
            try:
                while True:
                    self.wfile.write(block)
            except OSError:
                return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and served.mode != "ignore_range" and int(match[1]) < len(body):
            start = int(match[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if served.mode == "reset_once" and served.resets == 0:
            served.resets += 1
            half = len(body) // 2
            self.wfile.write(body[start:half])
            self.wfile.flush()
            # Let the client read the half: an RST makes the peer drop data it has not read.
            time.sleep(0.3)
            # SO_LINGER 0: close sends a TCP RST, a real connection reset.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        try:
            for at in range(start, len(body), CHUNK):
                self.wfile.write(body[at:at + CHUNK])
        except OSError:
            return


class FileServer:
    """`with FileServer(Served(data)) as server:` then GET server.url(name)."""

    def __init__(self, served: Served) -> None:
        self.served = served
        handler = type("Handler", (_Handler,), {"served": served})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str = "model.gguf") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{name}"

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
