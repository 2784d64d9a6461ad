"""agent/transport/mqtt.py against a real mosquitto: PUBACK only when the agent says so.

This is the test that pins aiomqtt 2.5's private path to paho's manual_ack: if an upgrade breaks
it, an unacked reading would no longer be redelivered, and this test fails.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config.settings import BrokerSection
from agent.transport import mqtt
from tests.harness import Mosquitto, publish_readings


async def _receive_one(broker: BrokerSection, *, ack: bool) -> bytes:
    async with mqtt.connect(broker, client_id="ack-test", persistent_session=True,
                            manual_ack=True) as link:
        await link.subscribe(["sensors/#"])
        batch = await asyncio.wait_for(link.next_batch(10, 0.2), 10)
        if ack:
            link.ack_all(batch)
            await asyncio.sleep(0.2)  # let the PUBACK leave before DISCONNECT
        return b"|".join(m.payload for m in batch)


async def _subscribe_only(broker: BrokerSection) -> None:
    async with mqtt.connect(broker, client_id="ack-test", persistent_session=True,
                            manual_ack=True) as link:
        await link.subscribe(["sensors/#"])


async def _nothing_pending(broker: BrokerSection) -> bool:
    async with mqtt.connect(broker, client_id="ack-test", persistent_session=True,
                            manual_ack=True) as link:
        try:
            await asyncio.wait_for(link.next_batch(10, 0), 1.0)
        except TimeoutError:
            return True
        return False


def test_unacked_message_is_redelivered_and_acked_one_is_not(tmp_path: Path) -> None:
    """A QoS 1 message received without an ack comes back on the next connection of the same
    persistent session; once acked, the next connection receives nothing."""
    local = Mosquitto("local", tmp_path).start()
    try:
        broker = BrokerSection(port=local.port)
        asyncio.run(_subscribe_only(broker))  # creates the persistent session
        publish_readings(local.port, [("sensors/a/temperature", b"reading-1")])

        first = asyncio.run(_receive_one(broker, ack=False))
        second = asyncio.run(_receive_one(broker, ack=True))
        assert first == second == b"reading-1"
        assert asyncio.run(_nothing_pending(broker))
    finally:
        local.kill()


async def _lone_then_stream(broker: BrokerSection, port: int) -> tuple[list[bytes], list[bytes]]:
    async with mqtt.connect(broker, client_id="batch-test", persistent_session=False,
                            manual_ack=True) as link:
        await link.subscribe(["sensors/#"])
        publish_readings(port, [("sensors/a/temperature", b"lone")])
        # A reading that comes alone is not held for the batch wait (3 s here).
        lone = await asyncio.wait_for(link.next_batch(10, 3.0), 2.5)
        publish_readings(port, [("sensors/a/temperature", b"stream-1")])
        later = asyncio.get_running_loop().call_later(
            0.5, publish_readings, port, [("sensors/a/temperature", b"stream-2")])
        try:
            # This one follows the last batch within the wait: it waits for company.
            stream = await asyncio.wait_for(link.next_batch(10, 3.0), 10)
        finally:
            later.cancel()
        link.ack_all(lone + stream)
        return [m.payload for m in lone], [m.payload for m in stream]


def test_a_lone_reading_is_not_held_for_the_batch_wait_but_a_stream_is_batched(
        tmp_path: Path) -> None:
    local = Mosquitto("local", tmp_path).start()
    try:
        lone, stream = asyncio.run(_lone_then_stream(BrokerSection(port=local.port), local.port))
        assert lone == [b"lone"]
        assert stream == [b"stream-1", b"stream-2"]
    finally:
        local.kill()


async def _take(broker: BrokerSection, count: int, acked: int) -> list[bytes]:
    """Receive `count` messages in batches, ack the first `acked` of them (`ack_all`, in the
    batches they came in), and disconnect."""
    got: list[bytes] = []
    async with mqtt.connect(broker, client_id="ack-test", persistent_session=True,
                            manual_ack=True) as link:
        await link.subscribe(["sensors/#"])
        while len(got) < count:
            batch = await asyncio.wait_for(link.next_batch(256, 0), 10)
            link.ack_all(batch[:max(0, acked - len(got))])
            got += [m.payload for m in batch]
        await asyncio.sleep(0.3)  # let the PUBACKs leave before DISCONNECT
    return got


def test_a_backlog_read_in_chunks_is_acked_in_one_write_per_batch_exactly(
        tmp_path: Path) -> None:
    """A backlog larger than one socket read (with a 100 kB payload spanning several reads) is
    received whole and in order through the buffered reader; the PUBACKs of the first 600,
    sent one batch at a time, are the only ones the broker counts: the next connection gets
    exactly the other messages again, in order, and once those are acked, nothing."""
    local = Mosquitto("local", tmp_path).start()
    try:
        broker = BrokerSection(port=local.port)
        asyncio.run(_subscribe_only(broker))
        payloads = [f'{{"seq": {i}, "pad": "{"x" * (i % 50)}"}}'.encode() for i in range(900)]
        payloads[300] = b'{"big": "' + b"y" * 100_000 + b'"}'
        publish_readings(local.port, [(f"sensors/s{i % 7}/t", p) for i, p in enumerate(payloads)])
        assert asyncio.run(_take(broker, 900, acked=600)) == payloads
        assert asyncio.run(_take(broker, 300, acked=300)) == payloads[600:]
        assert asyncio.run(_nothing_pending(broker))
    finally:
        local.kill()


class _Chunks:
    """A non-blocking socket's recv results, in order (bytes, or an exception to raise)."""

    def __init__(self, *results: bytes | OSError) -> None:
        self.results = list(results)

    def recv(self, size: int) -> bytes:
        if not self.results:
            raise BlockingIOError
        result = self.results.pop(0)
        if isinstance(result, OSError):
            raise result
        return result


def test_the_buffered_socket_hands_over_data_then_the_end_or_the_error_in_order() -> None:
    """paho sees the bytes of one read in the sizes it asks for, then BlockingIOError until
    the next fill; the end of the stream and a reset come only after the bytes before them."""
    closing = mqtt._BufferedSocket(_Chunks(b"abcdef", b""))
    closing.fill()
    assert (closing.recv(1), closing.recv(4), closing.recv(4)) == (b"a", b"bcde", b"f")
    assert closing.buffered == 0
    with pytest.raises(BlockingIOError):  # used up: as the empty socket, no system call
        closing.recv(1)
    closing.fill()  # the peer closed: b"" once the data is out
    assert (closing.recv(10), closing.buffered) == (b"", 1)

    reset = mqtt._BufferedSocket(_Chunks(b"xy", ConnectionResetError(104, "reset")))
    reset.fill()
    reset.fill()  # a second read before paho took the first: appended, error kept for later
    assert reset.recv(5) == b"xy"
    with pytest.raises(ConnectionResetError):
        reset.recv(1)
