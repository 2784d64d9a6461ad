"""The reference cloud consumer: what an operator runs next to the cloud broker.

It subscribes to `<prefix>/+/#` at QoS 1 with a persistent session (a fixed client id and
clean_session=0, so the broker queues records while it is away), writes every record into a
SQLite file, and drops duplicates by the record's `id`: the agent delivers at least once, this
turns it into exactly once. A record is PUBACKed only after its transaction committed (paho sends
the PUBACK when `on_message` returns), so a crash of this consumer loses nothing either.

    python tools/cloud_ingest.py --port 1883 --db cloud.db          # runs until Ctrl-C
    python tools/cloud_ingest.py --db cloud.db --report              # prints counts and exits

Tables: `records` (one row per distinct id, in first-arrival order, with its topic, kind and
JSON body) and `counters` (messages received, duplicates dropped, payloads that were not JSON).
A result of a windowed route lists the readings it answers in `covers`: `covered` keeps, per
reading id, the first result that covered it, and `counters.covered_again` counts readings a
later, different result covered again.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    arrival INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS covered (
    reading_id TEXT PRIMARY KEY,
    record_id TEXT NOT NULL
);
"""


def _bump(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("INSERT INTO counters (name, value) VALUES (?, 1) "
                 "ON CONFLICT (name) DO UPDATE SET value = value + 1", (name,))


class CloudIngest:
    """A persistent-session subscriber that stores records deduplicated by `id`."""

    def __init__(self, db: Path, host: str = "127.0.0.1", port: int = 1883,
                 topic: str = "edge/#", client_id: str = "edge-cloud-ingest") -> None:
        self.db = db
        self.host, self.port, self.topic = host, port, topic
        self._conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=False)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.reconnect_delay_set(0.1, 2)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        kind = message.topic.split("/")[2] if message.topic.count("/") >= 2 else ""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                _bump(self._conn, "received")
                try:
                    body = json.loads(message.payload)
                    record_id = str(body["id"])
                except (ValueError, KeyError, TypeError):
                    _bump(self._conn, "not_json")
                else:
                    cursor = self._conn.execute(
                        "INSERT INTO records (id, topic, kind, body, received_at) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                        (record_id, message.topic, kind, json.dumps(body), time.time()))
                    if cursor.rowcount == 0:
                        _bump(self._conn, "duplicates")
                    elif isinstance(body.get("covers"), list):
                        self._cover(record_id, body["covers"])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _cover(self, record_id: str, reading_ids: list[Any]) -> None:
        """A window's result: the first result to cover a reading keeps it; a later result
        that covers it again (windows formed differently after a redelivery) is counted."""
        for reading_id in reading_ids:
            cursor = self._conn.execute(
                "INSERT INTO covered (reading_id, record_id) VALUES (?, ?) "
                "ON CONFLICT (reading_id) DO NOTHING", (str(reading_id), record_id))
            if cursor.rowcount == 0:
                _bump(self._conn, "covered_again")

    def start(self, timeout_s: float = 10.0) -> CloudIngest:
        """Connect (the broker must be up the first time, so the session exists) and subscribe."""
        self._client.connect(self.host, self.port, keepalive=5)
        self._client.loop_start()
        if not self._subscribed.wait(timeout_s):
            raise TimeoutError(f"no SUBACK from {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        with self._lock:
            self._conn.close()

    def counts(self) -> dict[str, int]:
        return report(self.db)


def report(db: Path) -> dict[str, int]:
    """Counts from a consumer database, read-only: safe while the consumer runs."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        kinds = dict(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall())
        distinct = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        covered = conn.execute("SELECT count(*) FROM covered").fetchone()[0]
    finally:
        conn.close()
    out = {"received": counters.get("received", 0), "distinct": distinct,
           "duplicates": counters.get("duplicates", 0), "not_json": counters.get("not_json", 0)}
    if covered or counters.get("covered_again"):
        out.update(covered_readings=covered, covered_again=counters.get("covered_again", 0))
    out.update({f"kind_{kind}": n for kind, n in sorted(kinds.items())})
    return out


def records(db: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, kind, body) of every distinct record, in first-arrival order."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT id, kind, body FROM records ORDER BY arrival").fetchall()
    finally:
        conn.close()
    return [(rid, kind, json.loads(body)) for rid, kind, body in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--topic", default="edge/#", help="topic filter (default edge/#)")
    parser.add_argument("--client-id", default="edge-cloud-ingest",
                        help="fixed: the broker keeps the session under it")
    parser.add_argument("--db", type=Path, required=True, help="the SQLite file to write")
    parser.add_argument("--report", action="store_true", help="print counts and exit")
    parser.add_argument("--every-s", type=float, default=10.0, help="counts printed this often")
    args = parser.parse_args(argv)
    if args.report:
        print(json.dumps(report(args.db)))
        return 0
    consumer = CloudIngest(args.db, args.host, args.port, args.topic, args.client_id).start()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(args.every_s):
            print(json.dumps(consumer.counts()), flush=True)
    finally:
        consumer.stop()
        print(json.dumps(report(args.db)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
