"""A cloud broker behind a real, impairable IP link for the tests of issue 14: a network
namespace made by the test, a point-to-point link from the host into it on a private /30
(10.213.N.0/30), and packet loss, delay or a black hole applied to the packets on that link.

It owns the namespace, the link and the processes it starts inside the namespace, and removes
all of them in `close()`. It never routes anywhere else: the only addresses used are the two
ends of the /30 and the namespace's own loopback.

Two ways to impair the link, the same packets either way (the kernel's TCP on both ends sees
real loss, real delay and real silence):
- `tc qdisc ... netem` on a veth pair, where the kernel has sch_netem;
- otherwise a pair of TUN devices (one on the host, one in the namespace) joined by a thread of
  this process that forwards each IP packet, dropping or holding it as told. Kernels built
  without CONFIG_NET_SCH_NETEM (this project's CI VM: `tc qdisc add ... netem` answers
  "Specified qdisc kind is unknown") still get the test this way.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import random
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.harness import Mosquitto, wait_until

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def _tool(name: str) -> str | None:
    """`ip` and `tc` live in /usr/sbin, which a PATH may leave out."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [_tool(args[0]) or args[0], *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=20)


def _check(*args: str) -> None:
    done = _run(*args)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "tc"):
        if _tool(tool) is None:
            return f"`{tool}` is missing (apt-get install iproute2)"
    name = f"eaprobe{secrets.token_hex(3)}"
    done = _run("ip", "netns", "add", name)
    if done.returncode != 0:
        return f"ip netns add failed: {done.stderr.strip()}"
    _run("ip", "netns", "del", name)
    return None


def _netem_available(namespace: str) -> bool:
    """Whether the kernel has sch_netem, probed on the namespace's loopback (never the host's)."""
    done = _run("tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem",
                "delay", "0ms")
    if done.returncode != 0:
        return False
    _run("tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root")
    return True


def in_namespace(namespace: str, work: Callable[[], T]) -> T:
    """Run `work` on a thread that has entered `namespace`: sockets it opens, and threads it
    starts (paho's network loop), live in that namespace. The caller's thread is untouched."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: list[T] = []
    failure: list[BaseException] = []

    def enter_and_work() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        finally:
            os.close(fd)
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=enter_and_work, name=f"in-netns-{namespace}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


class _Wire:
    """Forwards IP packets between two TUN devices, with loss, a fixed delay per packet (order
    kept) or a black hole, the same in both directions (like netem on both ends of a veth)."""

    def __init__(self, host_fd: int, ns_fd: int) -> None:
        self._fds = {host_fd: ns_fd, ns_fd: host_fd}
        self._lock = threading.Lock()
        self._loss = 0.0
        self._delay_s = 0.0
        self._blackhole = False
        self._random = random.Random(14)
        self._stop_r, self._stop_w = os.pipe()
        self._pending: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self.dropped = 0
        self.forwarded = 0
        self._thread = threading.Thread(target=self._forward, name="tun-wire", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set(self, *, loss: float = 0.0, delay_s: float = 0.0, blackhole: bool = False) -> None:
        with self._lock:
            self._loss, self._delay_s, self._blackhole = loss, delay_s, blackhole

    def _forward(self) -> None:
        readable = [*self._fds, self._stop_r]
        while True:
            now = time.monotonic()
            while self._pending and self._pending[0][0] <= now:
                _, _, fd, packet = heapq.heappop(self._pending)
                os.write(fd, packet)
                self.forwarded += 1
            timeout = max(0.0, self._pending[0][0] - now) if self._pending else None
            ready, _, _ = select.select(readable, [], [], timeout)
            if self._stop_r in ready:
                return
            for fd in ready:
                packet = os.read(fd, 65536)
                with self._lock:
                    drop = self._blackhole or self._random.random() < self._loss
                    delay_s = self._delay_s
                if drop:
                    self.dropped += 1
                    continue
                self._seq += 1
                heapq.heappush(self._pending,
                               (time.monotonic() + delay_s, self._seq, self._fds[fd], packet))

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=10)
        os.close(self._stop_r)
        os.close(self._stop_w)


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class CloudNamespace:
    """A namespace `ea<hex>` holding the cloud end of a point-to-point link on 10.213.N.0/30:
    the host is 10.213.N.1, the namespace 10.213.N.2. `impair`, `blackhole` and `heal` act on
    both directions of that link."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"ea{tag}"
        self.host_dev = f"ea{tag}h"
        self.ns_dev = f"ea{tag}n"
        self.subnet = self._free_subnet()
        self.host_addr = f"10.213.{self.subnet}.1"
        self.ns_addr = f"10.213.{self.subnet}.2"
        self.backend = ""
        self._wire: _Wire | None = None
        self._tun_fds: list[int] = []
        self.brokers: list[Mosquitto] = []

    @staticmethod
    def _free_subnet() -> int:
        used = _run("ip", "-4", "-o", "addr", "show").stdout
        for _ in range(100):
            candidate = random.randrange(256)
            if f"10.213.{candidate}." not in used:
                return candidate
        raise RuntimeError("no free 10.213.N.0/30 subnet")

    def open(self) -> CloudNamespace:
        _check("ip", "netns", "add", self.name)
        _check("ip", "-n", self.name, "link", "set", "lo", "up")
        if _netem_available(self.name):
            self.backend = "netem"
            _check("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name",
                   self.ns_dev)
        else:
            self.backend = "tun"
            self._tun_fds = [_open_tun(self.host_dev), _open_tun(self.ns_dev)]
        _check("ip", "link", "set", self.ns_dev, "netns", self.name)
        _check("ip", "addr", "add", self.host_addr, "peer", f"{self.ns_addr}/30",
               "dev", self.host_dev)
        _check("ip", "-n", self.name, "addr", "add", self.ns_addr, "peer", f"{self.host_addr}/30",
               "dev", self.ns_dev)
        _check("ip", "link", "set", self.host_dev, "up")
        _check("ip", "-n", self.name, "link", "set", self.ns_dev, "up")
        if self.backend == "tun":
            self._wire = _Wire(*self._tun_fds)
            self._wire.start()
        return self

    def _netem(self, *params: str) -> None:
        for prefix in (("tc",), ("tc", "-n", self.name)):
            dev = self.host_dev if len(prefix) == 1 else self.ns_dev
            _check(*prefix, "qdisc", "replace", "dev", dev, "root", "netem", *params)

    def impair(self, *, loss_pct: float, delay_ms: int) -> None:
        """Lose `loss_pct` % of the packets and delay the others by `delay_ms`, each way."""
        if self._wire is not None:
            self._wire.set(loss=loss_pct / 100, delay_s=delay_ms / 1000)
        else:
            self._netem("loss", f"{loss_pct}%", "delay", f"{delay_ms}ms")

    def blackhole(self) -> None:
        """Drop every packet, each way, silently: no RST, no ICMP, nothing refused."""
        if self._wire is not None:
            self._wire.set(blackhole=True)
        else:
            self._netem("loss", "100%")

    def heal(self) -> None:
        if self._wire is not None:
            self._wire.set()
        else:
            _run("tc", "qdisc", "del", "dev", self.host_dev, "root")
            _run("tc", "-n", self.name, "qdisc", "del", "dev", self.ns_dev, "root")

    @property
    def dropped(self) -> int:
        """Packets dropped on the link so far, both ways (the wire's count, or netem's)."""
        if self._wire is not None:
            return self._wire.dropped
        total = 0
        for prefix, dev in ((("tc",), self.host_dev), (("tc", "-n", self.name), self.ns_dev)):
            stats = _run(*prefix, "-s", "qdisc", "show", "dev", dev).stdout
            for match in re.finditer(r"dropped (\d+)", stats):
                total += int(match.group(1))
        return total

    def connect_s(self, port: int, timeout_s: float) -> float:
        """Seconds a TCP connect from the host to the namespace end takes (one handshake: a
        round trip on the link); raises TimeoutError when no answer comes, OSError if refused."""
        started = time.monotonic()
        with socket.create_connection((self.ns_addr, port), timeout=timeout_s):
            return time.monotonic() - started

    def mosquitto(self, role: str, workdir: Path) -> NamespacedMosquitto:
        broker = NamespacedMosquitto(self, role, workdir)
        self.brokers.append(broker)
        return broker

    def close(self) -> None:
        """Stop the brokers, then remove the link and the namespace; safe to call twice."""
        for broker in self.brokers:
            broker.kill()
        if self._wire is not None:
            self._wire.stop()
            self._wire = None
        for fd in self._tun_fds:
            os.close(fd)
        self._tun_fds = []
        _run("ip", "link", "del", self.host_dev)
        _run("ip", "netns", "del", self.name)


class NamespacedMosquitto(Mosquitto):
    """A harness Mosquitto run inside the namespace, listening on the namespace's loopback (for a
    collector that runs in there too) and on the link's namespace address (for the agent)."""

    def __init__(self, namespace: CloudNamespace, role: str, workdir: Path) -> None:
        # A port is free in a namespace that is new: nothing else listens there.
        port = 18830
        super().__init__(role, workdir, port=port,
                         listener_options=f"listener {port} {namespace.ns_addr}")
        self.namespace = namespace

    def start(self, timeout_s: float = 10.0) -> NamespacedMosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = (self.dir / "mosquitto.log").open("ab")
        # `ip netns exec` execs mosquitto, so the pid is mosquitto's and kill() reaches it.
        command = [_tool("ip") or "ip", "netns", "exec", self.namespace.name, binary,
                   "-c", str(self.conf)]
        self.proc = subprocess.Popen(command, stdout=log, stderr=log)
        wait_until(lambda: self._accepts() or not self.running, timeout_s,
                   f"mosquitto {self.role} on {self.namespace.ns_addr}:{self.port}")
        if not self.running:
            raise RuntimeError(f"mosquitto {self.role} exited; see {self.dir / 'mosquitto.log'}")
        return self

    def _accepts(self) -> bool:
        """Across the link, from the host (call it only while the link is healthy)."""
        try:
            with socket.create_connection((self.namespace.ns_addr, self.port), timeout=0.2):
                return True
        except OSError:
            return False
