"""agent/transport/mqtt.py and what a broker says, or does not say, in its CONNACK.

A broker that never answers CONNECT, or closes the connection after reading it (an MQTT 5-only
broker may do either with an MQTT 3.1.1 CONNECT, as may something that is not an MQTT broker),
is reported as such instead of aiomqtt's bare "Operation timed out"; a close is reported at
once, not after the whole connect timeout. The session-present flag of a real mosquitto's
CONNACK reaches the link: set while the broker kept the persistent session, clear after a
restart that lost it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config.settings import BrokerSection
from agent.transport import mqtt
from tests.harness import Mosquitto


async def _connect_once(broker: BrokerSection) -> None:
    async with mqtt.connect(broker, client_id="connack-test", persistent_session=False,
                            name="local_broker"):
        pass


async def _connect_to_a_mute_peer(close: bool) -> str:
    """Connect to a TCP server that reads the CONNECT and then says nothing (or closes);
    return the LinkDown message."""
    got_connect = asyncio.Event()
    client_closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await reader.read(1) == b"\x10":  # CONNECT's fixed header
                got_connect.set()
            if not close:
                await reader.read()  # EOF: the client closed its socket
                client_closed.set()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # paho itself drops an unanswered connection only after a keepalive: 300 s here.
        broker = BrokerSection(port=port, connect_timeout_s=1.0 if close else 1.5,
                               keepalive_s=300)
        # A close reported only when the timeout ran out would read "no CONNACK within";
        # 60 s only bounds the test.
        with pytest.raises(mqtt.LinkDown) as refused:
            await asyncio.wait_for(_connect_once(broker), 60)
        assert got_connect.is_set(), "the peer never saw a CONNECT"
        if not close:
            # A client that gave up must not leave its socket open (one per retry); 60 s is
            # generous for a close that comes at once, and well short of the keepalive.
            await asyncio.wait_for(client_closed.wait(), 60)
        return str(refused.value)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("close", [False, True], ids=["never_answers", "closes"])
def test_a_broker_that_gives_no_connack_is_reported_as_not_speaking_mqtt_311(
    close: bool,
) -> None:
    """A peer that reads CONNECT and never answers, or closes, is reported as a broker that may
    not speak MQTT 3.1.1, saying whether it closed or stayed silent; against the silent one the
    client closes its socket when it gives up."""
    message = asyncio.run(_connect_to_a_mute_peer(close))
    print(message)
    assert "the broker may not speak MQTT 3.1.1" in message, message
    if close:
        assert "the broker closed the connection before CONNACK" in message, message
    else:
        assert "no CONNACK within 1.5s" in message, message
    assert "Operation timed out" not in message


async def _session_present(broker: BrokerSection) -> bool:
    async with mqtt.connect(broker, client_id="session-test", persistent_session=True,
                            manual_ack=True) as link:
        await link.subscribe(["sensors/#"])
        return link.session_present


@pytest.mark.parametrize("persistence", [True, False], ids=["kept", "lost"])
def test_the_link_reports_whether_the_broker_kept_the_persistent_session(
    tmp_path: Path, persistence: bool
) -> None:
    """After a broker restart, session_present is true with its persistence file kept and false
    without it; a first connect never finds a session."""
    local = Mosquitto("local", tmp_path).start()
    try:
        broker = BrokerSection(port=local.port)
        assert asyncio.run(_session_present(broker)) is False  # the session is created
        assert asyncio.run(_session_present(broker)) is True
        local.stop()  # SIGTERM: mosquitto writes its persistence file
        database = local.dir / "mosquitto.db"
        assert database.exists()
        if not persistence:
            database.unlink()  # as a broker restarted without persistence
        local.start()
        assert asyncio.run(_session_present(broker)) is persistence
    finally:
        local.kill()
