"""MQTT transport: the only module that imports aiomqtt and paho.

aiomqtt 2.5 has no public manual-ack switch. Ingest must PUBACK a reading only after it is
committed, so this module calls paho's public `manual_ack_set`/`ack` on the paho client that
aiomqtt wraps and keeps private. aiomqtt is pinned to 2.5.x in pyproject.toml for that reason,
and tests/test_mqtt_ack.py proves an unacked message is redelivered on the next connection.
Every read of an aiomqtt or paho private attribute is in the section below the imports, one
function per attribute with the upstream issue that explains it; tests/test_mqtt_private.py
fails on one anywhere else.

The uplink publishes a whole window of rows without awaiting each one (`publish_nowait`):
aiomqtt's `publish` costs an Event, a `wait_for` task and a pending-call scan per message,
which capped the drain at under half of paho's own rate. Those PUBLISHes go to paho directly
and their PUBACKs are routed, by message id, from paho's `on_publish` to a callback, ahead of
aiomqtt's own handler, which still serves its awaited publishes.

The CONNACK is watched through paho's callbacks as well (`_Handshake`): aiomqtt 2.5 keeps
neither its session-present flag, which ingest needs to notice a local broker that lost its
persistent session, nor a connection closed before CONNACK, which it waits out for the whole
connect timeout and then reports as "Operation timed out". Here such a close fails the connect
at once, and every failure before CONNACK is a LinkDown saying what the broker probably refused.

Receiving is paho's too, below aiomqtt (issue 16: ingest drained a backlog at 0.38 of a bare paho
subscriber's rate): on a plain TCP link the socket is read in 64 KiB chunks that paho takes its
packets from (`_BufferedSocket`, `_read_buffered`), messages become Delivery records in a deque
(`_Deliveries`) instead of aiomqtt Messages for its iterator, and a committed batch's PUBACKs
leave in one write (`Link.ack_all`). aiomqtt still connects, subscribes, pings and disconnects.

A fresh `aiomqtt.Client` is made for every connection: re-entering one resends stale packets.
Library errors leave this module as `LinkDown`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from agent.base.errors import ConfigError, TransientError
from agent.base.records import Delivery
from agent.config.settings import BrokerSection

QOS_AT_LEAST_ONCE = 1
SUBACK_FAILURE = 0x80

T = TypeVar("T")


# --- aiomqtt's and paho's private attributes: read here and nowhere else --------------------------
# One function per attribute. Each says why there is no public way, citing the upstream issue;
# tests/test_mqtt_private.py fails on a private attribute of another object anywhere else in
# agent/, and checks that each one still exists in the installed aiomqtt and paho.


def _paho(client: aiomqtt.Client) -> paho.Client:
    """The paho client aiomqtt wraps (`aiomqtt.Client._client`).

    aiomqtt keeps it private on purpose, since through it a caller can replace the callbacks
    aiomqtt relies on; its maintainers wrap paho features one by one instead
    (https://github.com/empicano/aiomqtt/issues/191). Not wrapped in 2.5, so reached through it:
    manual acks, paho's public `manual_ack_set`/`ack` (https://github.com/empicano/aiomqtt/issues/345,
    with https://github.com/empicano/aiomqtt/pull/346 still open); a publish that returns paho's
    MQTTMessageInfo instead of awaiting each PUBACK; the CONNACK's flags and a close before it;
    and socket and PUBACK callbacks chained ahead of aiomqtt's own.
    """
    return client._client


def _lost(client: aiomqtt.Client) -> asyncio.Future[None]:
    """The future aiomqtt resolves, or fails, when the connection ends (`Client._disconnected`).

    aiomqtt 2.5 reports a lost connection only to a pending `messages` iteration or to the next
    call, so a link that is idle or only publishes learns of it late
    (https://github.com/empicano/aiomqtt/issues/326: an idle client noticed a keepalive
    disconnect only at its next publish); https://github.com/empicano/aiomqtt/issues/6 awaits
    this same future for want of a public one. Read it when needed: aiomqtt replaces it on connect.
    """
    return client._disconnected


def _connack_wait(client: aiomqtt.Client) -> asyncio.Future[None]:
    """The future aiomqtt's connect awaits for the CONNACK (`Client._connected`).

    aiomqtt's on_disconnect ignores a close before CONNACK, so its connect waits out the whole
    timeout and then says only "Operation timed out" (the symptom in
    https://github.com/empicano/aiomqtt/issues/284, a broker refusing a new client certificate).
    Failing this future is the only way to end that wait at once. aiomqtt replaces it after a
    failed connect, so read it before connecting.
    """
    return client._connected


def _pingreq_sent_at(paho_client: paho.Client) -> float:
    """paho's monotonic time of the PINGREQ still waiting for its PINGRESP, 0 when none is
    (`paho.Client._ping_t`).

    paho 2.x has no public ping state and no PINGRESP timeout: it gives a PINGRESP a whole
    keepalive, checked on aiomqtt's 1 s tick. Users report dead links noticed many minutes late
    or not at all (https://github.com/eclipse-paho/paho.mqtt.python/issues/594,
    https://github.com/eclipse-paho/paho.mqtt.python/issues/605); no issue asks for this state.
    """
    return float(paho_client._ping_t)


def _close_socket(paho_client: paho.Client) -> None:
    """Close paho's socket and take it off the event loop, as paho does itself on a lost link
    (`paho.Client._sock_close`).

    The public `disconnect()` would queue a DISCONNECT to a broker that never answered the
    CONNECT and leave the close to a later write; `reinitialise()` closes the socket as a side
    effect but raises on paho 2.0 and 2.1, which pyproject.toml allows
    (https://github.com/eclipse-paho/paho.mqtt.python/issues/824).
    """
    paho_client._sock_close()


def _queue_packet(paho_client: paho.Client, command: int, packet: bytes) -> None:
    """Queue raw bytes for paho to write after what it has queued already
    (`paho.Client._packet_queue`).

    paho's public `ack(mid, qos)` queues one PUBACK per call, and each queued packet costs a
    write to paho's wake-up socket pair and a call back into the event loop to watch the
    socket; acking a committed batch of hundreds of readings that way took a third of the
    ingest's time. paho has no public call to send several packets at once (none of its issues
    asks for one); this queues the batch's PUBACKs as one packet, written in one send.
    """
    paho_client._packet_queue(command, packet, 0, 0)


def _buffer_socket(paho_client: paho.Client) -> _BufferedSocket:
    """Put a `_BufferedSocket` in place of the plain TCP socket paho reads from
    (`paho.Client._sock`).

    paho reads a packet with three or more `recv` calls (the command byte, each byte of the
    remaining length, the rest), one system call each, and handles one packet per readable event:
    on a backlog of small readings that was most of a drain's time. paho has no way to read from
    a buffer (https://github.com/eclipse-paho/paho.mqtt.python/issues/131 is the TLS side of the
    same problem, which aiomqtt works around by looping while the TLS socket has data pending).
    """
    buffered = _BufferedSocket(paho_client.socket())
    paho_client._sock = buffered
    return buffered


# --- end of the private attributes ---------------------------------------------------------------

# PUBACK, MQTT 3.1.1 section 3.4: fixed header 0x40, remaining length 2, the packet identifier.
_PUBACK = 0x40
# How much one read of the socket takes at most: some 900 readings of 70 bytes.
READ_CHUNK = 64 * 1024


class _BufferedSocket:
    """A non-blocking TCP socket read in chunks of up to READ_CHUNK bytes.

    Only `fill` reads the socket, once per readable event (`_read_buffered`); `recv` serves
    paho from what `fill` got and raises BlockingIOError, as the empty non-blocking socket
    would, once that is used up, so paho keeps a packet split between two reads as it always
    has. The end of the stream and a socket error are handed to paho by `recv` in their turn,
    after the bytes that came before them. Everything else is the socket's own.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0
        self._closed = False  # the peer closed the stream: recv returns b"" once data is out
        self._error: OSError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    @property
    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet, or 1 while the end of the
        stream or an error waits to be handed over."""
        left = len(self._data) - self._pos
        return left if left else int(self._closed or self._error is not None)

    def fill(self) -> None:
        """One read of the socket into the buffer (called with the buffer used up)."""
        if self._closed or self._error is not None:
            return
        try:
            data = self._sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._error = exc
            return
        if data:
            self._data, self._pos = self._data[self._pos:] + data, 0
        else:
            self._closed = True

    def recv(self, size: int) -> bytes:
        if self._pos < len(self._data):
            chunk = self._data[self._pos:self._pos + size]
            self._pos += len(chunk)
            return chunk
        if self._error is not None:
            raise self._error
        if self._closed:
            return b""
        raise BlockingIOError


class LinkDown(TransientError):
    """The broker connection failed, was refused or broke; reconnect with backoff."""


class Link:
    """One live connection to a broker."""

    def __init__(self, client: aiomqtt.Client, deliveries: _Deliveries, *,
                 manual_ack: bool, keepalive_s: int, session_present: bool = False) -> None:
        self._client = client
        self._paho = _paho(client)
        self._deliveries = deliveries
        # The CONNACK's session-present flag: False after clean_session=0 means the broker
        # kept no session for this client id (a first connect, or a session it lost).
        self.session_present = session_present
        self._keepalive_s = keepalive_s
        self._manual_ack = manual_ack
        self._last_first_mono = float("-inf")  # when the last batch's first message came
        # PUBACK callbacks of `publish_nowait`, by message id. paho calls on_publish on the
        # event loop (aiomqtt drives its socket from there); other ids go on to aiomqtt.
        self._pubacks: dict[int, Callable[[], None]] = {}
        aiomqtt_on_publish: Callable[..., None] | None = self._paho.on_publish

        def on_publish(c: paho.Client, userdata: Any, mid: int, reason: Any,
                       properties: Any) -> None:
            callback = self._pubacks.pop(mid, None)
            if callback is not None:
                callback()
            elif aiomqtt_on_publish is not None:
                aiomqtt_on_publish(c, userdata, mid, reason, properties)

        self._paho.on_publish = on_publish

    async def subscribe(self, topic_filters: Sequence[str]) -> None:
        """Subscribe to every filter at QoS 1; raise LinkDown if the broker refuses one."""
        try:
            granted = await self._client.subscribe(
                [(f, QOS_AT_LEAST_ONCE) for f in topic_filters]
            )
        except aiomqtt.MqttError as exc:
            raise LinkDown(f"subscribe failed: {exc}") from exc
        codes: list[int | ReasonCode] = list(granted)
        refused = [f for f, code in zip(topic_filters, codes, strict=False) if _refused(code)]
        if refused:
            raise LinkDown(f"broker refused subscriptions: {', '.join(refused)}")

    async def unsubscribe(self, topic_filters: Sequence[str]) -> None:
        try:
            await self._client.unsubscribe(list(topic_filters))
        except aiomqtt.MqttError as exc:
            raise LinkDown(f"unsubscribe failed: {exc}") from exc

    async def next_batch(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """Wait for one message, then gather what else arrives within `wait_s`, up to a limit.

        The wait is paid only inside a stream: when the previous batch began less than `wait_s`
        ago. A reading that comes alone (the one before it more than `wait_s` earlier) is
        committed at once, since nothing is likely to join it; a steady stream still gathers
        batches, and a backlog never waits (what is queued is taken at once).
        Messages are taken off the queue only when the batch is returned, so a cancelled wait
        loses none.
        """
        waiting, arrived = self._deliveries.waiting, self._deliveries.arrived
        while not waiting:
            arrived.clear()
            lost = _lost(self._client)
            if lost.done():
                raise LinkDown("connection lost")
            # The connection's end wakes this wait too (and `guard` cancels it anyway).
            arrival: asyncio.Future[Any] = asyncio.ensure_future(arrived.wait())
            lost_wait: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(lost))
            try:
                await asyncio.wait([arrival, lost_wait], return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()
                lost_wait.cancel()
        now = time.monotonic()
        in_stream = now - self._last_first_mono < wait_s
        self._last_first_mono = now
        if len(waiting) == 1 and wait_s > 0 and in_stream:
            await asyncio.sleep(wait_s)
        count = min(max_messages, len(waiting))
        return [waiting.popleft() for _ in range(count)]

    async def guard(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, but raise LinkDown as soon as the connection drops (paho's keepalive
        gave up on a half-open link, or the peer reset it). Without this an idle publisher
        would notice a dead link only at its next publish."""
        disconnected = _lost(self._client)
        work_task = asyncio.create_task(work, name="link-guarded-work")
        lost_task: asyncio.Future[None] = asyncio.ensure_future(asyncio.shield(disconnected))
        silence_task = asyncio.create_task(self._watch_silence(), name="link-silence-watch")
        watched: list[asyncio.Future[Any]] = [work_task, lost_task, silence_task]
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if work_task.done():
                return work_task.result()
            if silence_task.done():
                silence_task.result()  # raises LinkDown
            raise LinkDown("connection lost")
        finally:
            lost_task.cancel()
            silence_task.cancel()
            if not work_task.done():
                work_task.cancel()
                # The work's own error after the cancel does not matter: the link is down.
                await asyncio.gather(work_task, return_exceptions=True)

    async def _watch_silence(self) -> None:
        """Raise LinkDown when a PINGREQ has waited half a keepalive for its PINGRESP.

        paho pings after one keepalive without traffic but gives up only one keepalive after an
        unanswered ping, checked on aiomqtt's 1 s tick: up to 2 x keepalive + 1 s on a half-open
        link (measured 8.8 s at keepalive 5 s). paho pings at most keepalive + 1 s after the
        last exchange, so giving the PINGRESP half a keepalive detects a half-open link within
        1.5 x keepalive + 1 s, the bound MQTT 3.1.1 section 3.1.2.10 sets for the server side.
        """
        patience_s = 0.5 * self._keepalive_s
        while True:
            pinged = _pingreq_sent_at(self._paho)
            if pinged > 0 and time.monotonic() - pinged > patience_s:
                raise LinkDown(f"half-open link: no PINGRESP within {patience_s:.1f} s "
                               f"(keepalive {self._keepalive_s} s)")
            await asyncio.sleep(0.25)

    def ack_all(self, messages: Sequence[Delivery]) -> None:
        """Send the PUBACKs of `messages` in their order, in one write (see `_queue_packet`).
        Acks must go out in the order the messages came. Only QoS 1 messages are acked; the
        link subscribes at QoS 1, so none is QoS 2."""
        if not self._manual_ack:
            return
        packet = b"".join(_PUBACK.to_bytes(1, "big") + b"\x02" + m.mid.to_bytes(2, "big")
                          for m in messages if m.qos == QOS_AT_LEAST_ONCE)
        if packet:
            _queue_packet(self._paho, _PUBACK, packet)

    async def publish(
        self, topic: str, payload: bytes, *, timeout_s: float, retain: bool = False
    ) -> None:
        """Publish with QoS 1 and return only once the broker's PUBACK has arrived."""
        try:
            await self._client.publish(
                topic, payload, qos=QOS_AT_LEAST_ONCE, retain=retain, timeout=timeout_s
            )
        except aiomqtt.MqttError as exc:
            raise LinkDown(f"publish to {topic} failed: {exc}") from exc


    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool,
                       on_puback: Callable[[], None]) -> None:
        """Hand a QoS 1 PUBLISH to paho and return at once; `on_puback` runs on the event loop
        when the broker's PUBACK arrives, or never if the link breaks first (`guard` raises
        then). The caller bounds how many are outstanding and how long it waits for them.
        Packets go on the wire in call order."""
        info = self._paho.publish(topic, payload, qos=QOS_AT_LEAST_ONCE, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkDown(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if info.is_published():  # the PUBACK came in already
            on_puback()
        else:
            self._pubacks[info.mid] = on_puback


def _refused(granted: int | ReasonCode) -> bool:
    # paho 2 with the VERSION2 callback API reports ReasonCode objects even for MQTT 3.1.1.
    if isinstance(granted, ReasonCode):
        return bool(granted.is_failure)
    return granted >= SUBACK_FAILURE


class _ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker closed the connection after CONNECT without a CONNACK."""

    def __init__(self, socket_error: str | None) -> None:
        super().__init__("connection closed before CONNACK")
        self.socket_error = socket_error


class _Handshake:
    """What paho saw between opening the socket and the CONNACK, which aiomqtt 2.5 drops.

    Its callbacks wrap aiomqtt's own on the paho client and must be installed before CONNECT.
    They run on the event loop, except `on_socket_open`, which paho calls from aiomqtt's connect
    thread once TCP (and TLS) are up.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self.socket_opened = False
        self.connack = False
        self.session_present = False
        self.socket_error: str | None = None  # paho's last error line before CONNACK
        loop = asyncio.get_running_loop()
        paho_client = _paho(client)
        aiomqtt_on_socket_open: Callable[..., None] | None = paho_client.on_socket_open
        aiomqtt_on_connect: Callable[..., None] | None = paho_client.on_connect
        aiomqtt_on_disconnect: Callable[..., None] | None = paho_client.on_disconnect
        connecting = _connack_wait(client)

        def on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
            self.socket_opened = True
            if aiomqtt_on_socket_open is not None:
                aiomqtt_on_socket_open(c, userdata, sock)

        def on_log(c: paho.Client, userdata: Any, level: int, buf: str) -> None:
            if level == paho.MQTT_LOG_ERR:
                self.socket_error = buf  # e.g. "failed to receive on socket: [SSL: ...]"

        def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any = None) -> None:
            self.connack = True
            self.session_present = bool(flags.session_present)
            # paho formats a line for on_log, and for the logger aiomqtt gives it, per packet:
            # not on the publish or receive path.
            paho_client.on_log = None
            paho_client.disable_logger()
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(c, userdata, flags, reason, properties)

        def on_disconnect(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                          properties: Any = None) -> None:
            # aiomqtt ignores a disconnect before CONNACK and waits out its timeout instead.
            if not self.connack and not connecting.done():
                loop.call_soon_threadsafe(self._fail, connecting)
            if aiomqtt_on_disconnect is not None:
                aiomqtt_on_disconnect(c, userdata, flags, reason, properties)

        paho_client.on_socket_open = on_socket_open
        paho_client.on_log = on_log
        paho_client.on_connect = on_connect
        paho_client.on_disconnect = on_disconnect

    def _fail(self, connecting: asyncio.Future[None]) -> None:
        if not connecting.done():
            connecting.set_exception(_ClosedBeforeConnack(self.socket_error))


def _register_writes_while_open(client: aiomqtt.Client) -> None:
    """Have the event loop watch paho's socket for writing only while paho still has it open.

    aiomqtt 2.5 asks the loop to `add_writer` with `call_soon_threadsafe`, and paho first asks
    from aiomqtt's connect thread, for the CONNECT. When a broker closes the connection right
    after the TLS handshake (TLS 1.3: a refused client certificate), the loop's reader can see
    the close, and paho close the socket, before that `add_writer` runs: asyncio then logs a
    plain-text "Exception in callback ... add_writer" with EBADF (41 and 46 of 200 refused
    connects in a loop), or, had the descriptor number been reused meanwhile, watches someone
    else's descriptor. Here the check that the socket is still paho's and the `add_writer` are
    one loop callback. aiomqtt's handler for unregistering stays: it runs before paho's close.
    """
    loop = asyncio.get_running_loop()
    paho_client = _paho(client)

    def write() -> None:
        try:
            paho_client.loop_write()
        except Exception as exc:
            # As aiomqtt's own writer does: paho raising means the connection is broken.
            lost = _lost(client)
            if not lost.done():
                lost.set_exception(exc)

    def register(sock: Any) -> None:
        current = paho_client.socket()  # None once paho closed it
        if current is not None and current is sock:
            loop.add_writer(current.fileno(), write)

    def on_socket_register_write(c: paho.Client, userdata: Any, sock: Any) -> None:
        loop.call_soon_threadsafe(register, sock)

    paho_client.on_socket_register_write = on_socket_register_write


def _read_buffered(client: aiomqtt.Client) -> None:
    """Read a plain TCP link through a `_BufferedSocket`.

    Takes the place of aiomqtt's socket-open callback, which watches the socket with a reader
    that has paho handle one packet per readable event. This reader fills the buffer with one
    read and has paho handle packets until the buffer is used up, then returns to the loop:
    a readable event costs one system call and at most READ_CHUNK bytes of work, so other tasks
    (the commit of the previous batch) keep running during a flood. Like aiomqtt's, it fails
    the connection's future when paho raises (a broken connection), and starts aiomqtt's
    periodic task (keepalive pings) on the loop.
    """
    loop = asyncio.get_running_loop()
    paho_client = _paho(client)
    aiomqtt_on_socket_open: Callable[..., None] | None = paho_client.on_socket_open

    def read(buffered: _BufferedSocket) -> None:
        try:
            buffered.fill()
            while paho_client.socket() is buffered:
                paho_client.loop_read()
                if not buffered.buffered:
                    break
        except Exception as exc:  # as aiomqtt's reader: paho raising means the link is broken
            lost = _lost(client)
            if not lost.done():
                lost.set_exception(exc)

    def on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
        # Called from aiomqtt's connect thread, before paho sends CONNECT.
        if aiomqtt_on_socket_open is not None:
            aiomqtt_on_socket_open(c, userdata, sock)  # its reader, and its periodic task
        buffered = _buffer_socket(paho_client)
        # Runs after aiomqtt's add_reader (callbacks run in order): replaces its reader.
        loop.call_soon_threadsafe(loop.add_reader, sock.fileno(), read, buffered)

    paho_client.on_socket_open = on_socket_open


class _Deliveries:
    """Received messages as Delivery records, waiting for `Link.next_batch`.

    paho calls `on_message` on the event loop (the reader runs there). It stands in for
    aiomqtt's handler, which made an aiomqtt.Message (a validated Topic, a copy of the
    payload) and queued it for an iterator that spawned a task per message.
    """

    def __init__(self) -> None:
        self.waiting: deque[Delivery] = deque()
        self.arrived = asyncio.Event()

    def on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # A topic that is not UTF-8 raises here, as it did in aiomqtt's handler (brokers refuse
        # to route one: MQTT 3.1.1 section 1.5.3).
        self.waiting.append(Delivery(message.topic, bytes(message.payload), message.mid,
                                     message.qos, bool(message.retain)))
        self.arrived.set()


def _refusal(broker: BrokerSection, name: str, exc: aiomqtt.MqttError,
             handshake: _Handshake) -> str:
    """Why a connection failed, naming what the broker probably refused where it is likely."""
    where = f"{broker.host}:{broker.port}"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return f"{where}: TLS handshake refused: {cause}"
    no_connack: str | None = None
    if isinstance(exc, _ClosedBeforeConnack):
        said = f" ({exc.socket_error})" if exc.socket_error else ""
        no_connack = f"the broker closed the connection before CONNACK{said}"
    elif handshake.socket_opened and not handshake.connack and isinstance(cause, TimeoutError):
        # aiomqtt's wait for the CONNACK, not a TCP connect (or a DISCONNECT) that timed out.
        no_connack = f"no CONNACK within {broker.connect_timeout_s:g}s"
    if no_connack is not None:
        if broker.tls and broker.cert_file is not None:
            # TLS 1.3 lets the client finish its handshake before the broker checks the client
            # certificate (RFC 8446 4.4.2); a refusal then shows only as a missing CONNACK.
            return (f"{where}: TLS session opened but {no_connack}: the broker probably "
                    f"refused the client certificate {broker.cert_file} (check it against "
                    "the broker's CA)")
        if broker.tls:
            return (f"{where}: TLS session opened but {no_connack}: the broker probably "
                    f"requires a client certificate ({name}.cert_file is not set)")
        return (f"{where}: {no_connack}: the broker may not speak MQTT 3.1.1 (an MQTT "
                "5-only broker), or is not an MQTT broker")
    if broker.tls and isinstance(cause, OSError):
        # e.g. a plaintext listener resets the connection on our ClientHello.
        return f"{where}: TLS connection failed: {type(cause).__name__}: {cause}"
    return f"{where}: {exc}"


@asynccontextmanager
async def connect(
    broker: BrokerSection,
    *,
    client_id: str,
    persistent_session: bool,
    manual_ack: bool = False,
    max_inflight: int | None = None,
    will: tuple[str, bytes] | None = None,
    name: str = "broker",
) -> AsyncIterator[Link]:
    """Connect with a fresh client; MQTT 3.1.1 clean_session=0 when `persistent_session`.

    `will` (topic, payload) is a retained QoS 1 last will. With `broker.tls` the link is TLS or
    nothing: a refused handshake is a LinkDown naming the certificate problem, never a retry
    in plaintext.
    """
    kwargs: dict[str, Any] = {}
    if will is not None:
        kwargs["will"] = aiomqtt.Will(will[0], will[1], qos=QOS_AT_LEAST_ONCE, retain=True)
    if broker.tls:
        try:
            kwargs["tls_context"] = tls_context(broker, name)
        except ConfigError as exc:
            raise LinkDown(str(exc)) from exc
    if broker.username is not None:
        kwargs["username"] = broker.username
        if broker.password is not None:
            kwargs["password"] = broker.password.get_secret_value()
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=client_id,
        clean_session=not persistent_session,
        keepalive=broker.keepalive_s,
        timeout=broker.connect_timeout_s,
        max_inflight_messages=max_inflight,
        **kwargs,
    )
    # aiomqtt logs a warning for every call while more than this many are pending; a full
    # publish window is normal here, not a warning.
    client.pending_calls_threshold = max(client.pending_calls_threshold, (max_inflight or 0) * 2)
    if manual_ack:
        # Must be set before CONNECT: the broker may deliver queued messages right after CONNACK.
        _paho(client).manual_ack_set(True)
    deliveries = _Deliveries()
    _paho(client).on_message = deliveries.on_message
    _register_writes_while_open(client)
    if not broker.tls:  # aiomqtt's reader loops while a TLS socket has decrypted bytes pending
        _read_buffered(client)
    handshake = _Handshake(client)
    try:
        async with client:
            yield Link(client, deliveries, manual_ack=manual_ack,
                       keepalive_s=broker.keepalive_s, session_present=handshake.session_present)
    except aiomqtt.MqttError as exc:
        if not handshake.connack:
            # aiomqtt leaves the socket of a connect that timed out waiting for its CONNACK
            # open, and watched by the loop: one descriptor leaked per retry against a broker
            # that never answers. paho's own close also unregisters it from the loop.
            _close_socket(_paho(client))
        raise LinkDown(_refusal(broker, name, exc, handshake)) from exc


def tls_context(broker: BrokerSection, name: str) -> ssl.SSLContext:
    """A client context that verifies the broker (CA file or the system store, host name
    checked) and presents the client certificate for mutual TLS; ConfigError names the file."""
    try:
        context = ssl.create_default_context(
            cafile=str(broker.ca_file) if broker.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if broker.cert_file is not None:
            context.load_cert_chain(
                broker.cert_file, broker.key_file if broker.key_file is not None else None
            )
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f"{k}={getattr(broker, k)}" for k in ("ca_file", "cert_file", "key_file")
                          if getattr(broker, k) is not None)
        raise ConfigError(f"{name}: cannot load the TLS files ({files}): {exc}") from exc
    return context
