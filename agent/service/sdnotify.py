"""The sd_notify(3) protocol: datagrams of `KEY=VALUE` lines to systemd's $NOTIFY_SOCKET.

Owns the notification socket and nothing else: what to say and when is agent/service/systemd.py's
job. A plain AF_UNIX datagram socket, no libsystemd binding. The socket is non-blocking, so a send
never stalls the event loop; a datagram systemd cannot take right now is dropped and counted,
because the next tick says the same thing again. The address comes from agent/config/settings.py,
the only module that reads the environment.
"""

from __future__ import annotations

import socket

import structlog

log = structlog.get_logger()


class Notifier:
    """Sends state lines to systemd; does nothing when the service was not started by it."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._target: str | bytes = ""
        if not address:
            return
        if address.startswith("@"):
            # An abstract-namespace socket (sd_notify(3)): "@" stands for the leading NUL byte.
            self._target = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._target = address
        else:
            log.warning("notify_socket_unsupported", address=address)
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram with a line per field (READY=1, STATUS=...); True if it was sent."""
        if self._sock is None:
            return False
        lines = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            self._sock.sendto(lines.encode(), self._target)
        except OSError as exc:
            # EAGAIN when systemd's queue is full, ENOENT/ECONNREFUSED if it went away.
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("notify_send_failed", error=str(exc), dropped=self.dropped)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return value.replace("\n", " ")
