"""A TCP fault proxy for tests: asyncio on its own thread, driven from synchronous test code.

It sits between the agent and the cloud broker on 127.0.0.1 and makes network faults happen for
real, on real sockets:
  pass       forward both ways;
  refuse     stop listening, so new connections are refused (RST on SYN); live ones keep going;
  blackhole  accept and keep connections open but forward nothing, either way (a half-open link:
             the peer sees no FIN and no RST);
  drop_s2c   forward client-to-server, but forward only the first `n` server-to-client bytes of
             each new connection and swallow the rest (lost PUBACKs);
and `reset()` closes every live connection with an RST (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    s2c_budget: int | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """`FaultProxy(upstream_port).start()`, then `.port`, `.set_mode()`, `.reset()`, `.stop()`."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self.mode = "pass"
        self.s2c_bytes = 0
        self.accepted = 0
        self._conns: list[_Conn] = []
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)

    # -- driven from the test's thread ------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def set_mode(self, mode: str, s2c_bytes: int = 0) -> None:
        """pass | refuse | blackhole | drop_s2c (with `s2c_bytes` per new connection)."""
        if mode not in ("pass", "refuse", "blackhole", "drop_s2c"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        self._call(self._set_mode(mode, s2c_bytes))

    def reset(self) -> None:
        """Abort every live connection with an RST, both sides."""
        self._call(self._reset_all())

    @property
    def live(self) -> int:
        return len(self._conns)

    def _call(self, coro: object) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        future.result(10)

    # -- on the proxy's loop ----------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _set_mode(self, mode: str, s2c_bytes: int) -> None:
        self.mode, self.s2c_bytes = mode, s2c_bytes
        if mode == "refuse":
            await self._unlisten()
        else:
            await self._listen()

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._reset_all()

    async def _reset_all(self) -> None:
        for conn in list(self._conns):
            self._abort(conn)

    def _abort(self, conn: _Conn) -> None:
        for writer in (conn.client, conn.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in conn.tasks:
            task.cancel()
        if conn in self._conns:
            self._conns.remove(conn)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            c_writer.transport.abort()
            return
        budget = self.s2c_bytes if self.mode == "drop_s2c" else None
        conn = _Conn(c_writer, s_writer, budget)
        self._conns.append(conn)
        conn.tasks = [
            asyncio.create_task(self._pipe(conn, c_reader, s_writer, upstream=True),
                                name="proxy-c2s"),
            asyncio.create_task(self._pipe(conn, s_reader, c_writer, upstream=False),
                                name="proxy-s2c"),
        ]

    async def _pipe(self, conn: _Conn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    continue  # swallowed: nothing reaches the other side, nothing is closed
                if not upstream and conn.s2c_budget is not None:
                    data = data[: conn.s2c_budget]
                    conn.s2c_budget -= len(data)
                    if not data:
                        continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side closed: close the other (unless we are pretending the link is alive).
            if self.mode != "blackhole" and conn in self._conns:
                self._conns.remove(conn)
                for w in (conn.client, conn.server):
                    w.close()
