"""Model downloads for cloud commands, on real parts: a real HTTP server on loopback
(tests/fileserver.py), real httpx, real files, a real SQLite store for the reports, real
signed packages. The command is recorded and downloaded exactly as the running agent does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.base.records import ModelInfo
from agent.config.settings import Settings
from agent.inference.supervisor import InferenceWorker
from agent.inference.switch import WorkerSwitch
from agent.ota import directive, download, modelpkg
from agent.ota.modelpkg import MANIFEST, SIGNATURE, verify
from agent.ota.remote import ModelCommands
from agent.ota.state import ModelStore
from agent.ota.updates import Ota
from agent.routing.outbound import Topics
from agent.store.writer import Store
from tests.fileserver import FileServer, Served
from tests.otakit import keypair, package, write_golden
from tests.test_ota_swap import make_settings

SIZE = 8 * 1024 * 1024


def body_of(size: int = SIZE) -> bytes:
    return os.urandom(size)


async def fetch(server: FileServer, dest: Path, body: bytes, **kw: Any) -> download.Fetched:
    args: dict[str, Any] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                            "timeout_s": 10.0, "attempts": 3, "retry_pause_s": 0.05}
    args.update(kw)
    return await download.fetch(server.url(), dest, **args)


async def test_a_whole_file_downloads_hash_checked_in_one_connection(tmp_path: Path) -> None:
    body = body_of()
    with FileServer(Served(body)) as server:
        got = await fetch(server, tmp_path / "m.gguf", body)
    assert (tmp_path / "m.gguf").read_bytes() == body
    assert (got.connections, got.resumed_from) == (1, [])
    assert server.served.requests == [{"path": "/model.gguf", "range": None}]
    print(f"loopback download: {SIZE} bytes in {got.seconds:.3f} s = "
          f"{got.rate_bytes_s / 1e6:.1f} MB/s")


async def test_a_reset_mid_file_resumes_with_a_range_request(tmp_path: Path) -> None:
    """The server sends half the file and resets the connection (TCP RST); the download keeps
    the half, asks for the rest with Range, gets a 206 and ends with the exact file."""
    body = body_of()
    with FileServer(Served(body, mode="reset_once")) as server:
        got = await fetch(server, tmp_path / "m.gguf", body)
    assert (tmp_path / "m.gguf").read_bytes() == body
    assert got.connections == 2
    assert len(got.resumed_from) == 1
    assert 0 < got.resumed_from[0] <= SIZE // 2
    ranges = [r["range"] for r in server.served.requests]
    assert ranges == [None, f"bytes={got.resumed_from[0]}-"]
    print(f"reset at {got.resumed_from[0]} of {SIZE} bytes: resumed with "
          f"{ranges[1]!r}, {got.seconds:.3f} s in total")


async def test_a_server_ignoring_range_restarts_from_zero(tmp_path: Path) -> None:
    """A partial file from an earlier run; the server answers the Range request with a full
    200: the partial bytes are discarded, not glued in front of a second copy."""
    body = body_of(1 << 20)
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"x" * 1000)  # wrong bytes: only a restart from zero gives the right hash
    with FileServer(Served(body, mode="ignore_range")) as server:
        got = await fetch(server, dest, body)
    assert dest.read_bytes() == body
    assert got.resumed_from == [1000]
    assert server.served.requests[0]["range"] == "bytes=1000-"


async def test_a_server_sending_past_the_declared_size_is_abandoned_at_the_first_extra_byte(
    tmp_path: Path
) -> None:
    body = body_of(1 << 20)
    with FileServer(Served(body, mode="endless")) as server, \
            pytest.raises(download.DownloadRefused, match="more than the declared"):
        await fetch(server, tmp_path / "m.gguf", body)
    assert not (tmp_path / "m.gguf").exists()
    assert len(server.served.requests) == 1  # refused, not retried


async def test_a_flipped_byte_fails_the_hash_and_leaves_no_file(tmp_path: Path) -> None:
    body = body_of(1 << 20)
    flipped = bytearray(body)
    flipped[len(body) // 3] ^= 0x01
    with FileServer(Served(bytes(flipped))) as server, \
            pytest.raises(download.DownloadRefused, match="sha256"):
        await fetch(server, tmp_path / "m.gguf", body)
    assert not (tmp_path / "m.gguf").exists()


# -- commands ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("cmd-kit")
    key, public = keypair(work)
    pkg = package(work, key, "2", seed=2)
    manifest = json.loads((pkg / MANIFEST).read_text())
    return {"public": public, "key": key, "pkg": pkg, "manifest": manifest,
            "signature": (pkg / SIGNATURE).read_text().strip(),
            "gguf": (pkg / manifest["file"]).read_bytes()}


def command(signed: dict[str, Any], url: str, **edits: Any) -> bytes:
    return json.dumps({"manifest": {**signed["manifest"], **edits},
                       "signature": signed["signature"], "url": url}).encode()


@contextlib.asynccontextmanager
async def commands_for(settings: Settings) -> AsyncIterator[tuple[ModelCommands, Path]]:
    store = await Store.open(settings.store_path)
    worker = InferenceWorker(settings.model, ModelInfo("base", "1", "0" * 64, "unused"))
    ota = Ota(settings, store, WorkerSwitch(worker), Topics("edge", "gw"),
    ModelStore(settings.ota_dir))
    try:
        yield ModelCommands(settings, ota, Topics("edge", "gw")), settings.store_path
    finally:
        await store.close()


def events(store_path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(store_path)
    try:
        rows = conn.execute("SELECT payload FROM outbox WHERE kind = 'model_event' "
                            "ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [json.loads(r[0]) for r in rows]


async def test_a_command_downloads_into_incoming_as_a_verified_package(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    settings = make_settings(tmp_path, tiny_model, signed["public"])
    with FileServer(Served(signed["gguf"], mode="reset_once")) as server:
        async with commands_for(settings) as (commands, store_path):
            assert await commands.record(command(signed, server.url()))
            pending = list(settings.incoming_dir.glob(".download-*"))
            assert len(pending) == 1
            assert (pending[0] / "command.json").exists()
            # A redelivery of the same command (crash before the PUBACK) is recorded once.
            assert await commands.record(command(signed, server.url()))
            assert await commands.complete(pending[0])
            told = events(store_path)
    handed = [p for p in settings.incoming_dir.iterdir()]
    assert [p.name for p in handed] == [f"cmd-{pending[0].name.removeprefix('.download-')}"]
    verified = await verify(handed[0], [signed["public"]])
    assert verified.manifest.version == "2"
    assert [e["step"] for e in told] == ["command_accepted", "download_started", "downloaded"]
    assert told[-1]["figures"]["connections"] == 2
    assert [r["range"] is not None for r in server.served.requests] == [False, True]


async def test_a_tampered_manifest_is_refused_before_any_request(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """`size` edited after signing: refused with the reason, nothing requested or recorded."""
    settings = make_settings(tmp_path, tiny_model, signed["public"])
    with FileServer(Served(signed["gguf"])) as server:
        async with commands_for(settings) as (commands, store_path):
            payload = command(signed, server.url(), size=signed["manifest"]["size"] + 1)
            assert not await commands.record(payload)
            told = events(store_path)
    assert server.served.requests == []
    assert not settings.incoming_dir.exists() or not list(settings.incoming_dir.iterdir())
    assert told[0]["step"] == "command_refused"
    assert "signature does not verify" in told[0]["reason"]


async def test_an_older_version_is_refused_before_any_request(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    settings = make_settings(tmp_path, tiny_model, signed["public"], version="5")
    with FileServer(Served(signed["gguf"])) as server:
        async with commands_for(settings) as (commands, store_path):
            assert not await commands.record(command(signed, server.url()))
            told = events(store_path)
    assert server.served.requests == []
    assert told[0]["step"] == "command_refused"
    assert "anti-rollback" in told[0]["reason"]


@pytest.mark.parametrize("mode", ["endless", "flipped"])
async def test_a_bad_download_installs_nothing_and_reports_why(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path, mode: str
) -> None:
    settings = make_settings(tmp_path, tiny_model, signed["public"])
    body = bytearray(signed["gguf"])
    body[len(body) // 2] ^= 0x40
    served = Served(bytes(body)) if mode == "flipped" else Served(b"", mode="endless")
    with FileServer(served) as server:
        async with commands_for(settings) as (commands, store_path):
            assert await commands.record(command(signed, server.url()))
            pending = next(settings.incoming_dir.glob(".download-*"))
            assert not await commands.complete(pending)
            told = events(store_path)
    assert list(settings.incoming_dir.iterdir()) == []
    assert told[-1]["step"] == "download_failed"
    expected = "more than the declared" if mode == "endless" else "does not match"
    assert expected in told[-1]["reason"]


async def test_a_record_left_by_a_stop_resumes_from_its_partial_file(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """A stop (or crash) mid-download leaves the record and a partial GGUF; the next start
    asks only for the rest."""
    settings = make_settings(tmp_path, tiny_model, signed["public"])
    half = len(signed["gguf"]) // 2
    with FileServer(Served(signed["gguf"])) as server:
        async with commands_for(settings) as (commands, _):
            assert await commands.record(command(signed, server.url()))
            pending = next(settings.incoming_dir.glob(".download-*"))
            (pending / signed["manifest"]["file"]).write_bytes(signed["gguf"][:half])
        async with commands_for(settings) as (restarted, _):
            assert await restarted.complete(pending)
    assert [r["range"] for r in server.served.requests] == [f"bytes={half}-"]
    package = next(settings.incoming_dir.iterdir())
    assert (package / signed["manifest"]["file"]).read_bytes() == signed["gguf"]


@pytest.mark.parametrize("devices", [["gw"], ["gw-elsewhere"]])
async def test_a_command_with_a_rollback_directive_may_bring_an_older_version_back(
    signed: dict[str, Any], tmp_path: Path, tiny_model: Path, devices: list[str]
) -> None:
    """Base version 5; a command for version 2 carrying a signed directive for this device is
    recorded with its directive, and the handed-over package carries it into the pipeline. A
    directive for another device is refused before any request."""
    settings = make_settings(tmp_path, tiny_model, signed["public"], version="5")
    manifest = modelpkg.parse_manifest(signed["manifest"], "test")
    body, signature = directive.make(manifest, devices=devices, valid_for_s=600,
                                     reason="5 misreads frost", key=signed["key"])
    payload = json.loads(command(signed, "http://unused/"))
    with FileServer(Served(signed["gguf"])) as server:
        payload["url"] = server.url()
        payload["rollback"] = {"directive": body, "signature": signature}
        async with commands_for(settings) as (commands, store_path):
            recorded = await commands.record(json.dumps(payload).encode())
            pending = list(settings.incoming_dir.glob(".download-*"))
            if recorded:
                assert await commands.complete(pending[0])
            told = events(store_path)
    if devices == ["gw-elsewhere"]:
        assert not recorded
        assert not pending
        assert server.served.requests == []
        assert "not for device 'gw'" in told[0]["reason"]
        return
    assert told[0]["step"] == "command_accepted"
    assert told[0]["rollback_directive"] == directive.parse(body, signature, [signed["public"]],
                                                            "test").id
    handed = next(settings.incoming_dir.glob("cmd-*"))
    allowed = directive.read(handed, [signed["public"]])
    assert allowed is not None
    assert allowed.devices == ("gw",)


async def test_a_command_carries_the_golden_files_its_manifest_signs(
    tmp_path: Path, tiny_model: Path
) -> None:
    """`model command` puts a package's golden file in the command; the handed-over package
    verifies with it. Without it, or with it edited, the command is refused before any request."""
    key, public = keypair(tmp_path)
    golden = write_golden(tmp_path / "eval" / "eval-temperature.jsonl",
                          [("sensors/s1/temperature", {"celsius": 20}, {"level": "normal"})])
    pkg = package(tmp_path, key, "2", seed=2, golden=[("temperature", golden, 0.9)])
    manifest = json.loads((pkg / MANIFEST).read_text())
    printed = (await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "agent", "model", "command", str(pkg), "--url",
                         "http://unused/"], capture_output=True, text=True, timeout=60,
        check=True)).stdout
    assert json.loads(printed)["golden"] == {"eval-temperature.jsonl": golden.read_text()}
    settings = make_settings(tmp_path, tiny_model, public)
    with FileServer(Served((pkg / manifest["file"]).read_bytes())) as server:
        body = {**json.loads(printed), "url": server.url()}
        async with commands_for(settings) as (commands, store_path):
            assert not await commands.record(json.dumps({**body, "golden": {}}).encode())
            edited = {"eval-temperature.jsonl": golden.read_text().replace("normal", "NORMAL")}
            assert not await commands.record(json.dumps({**body, "golden": edited}).encode())
            assert server.served.requests == []
            assert await commands.record(json.dumps(body).encode())
            (pending,) = settings.incoming_dir.glob(".download-*")
            assert await commands.complete(pending)
            told = events(store_path)
    reasons = [e["reason"] for e in told if e["step"] == "command_refused"]
    assert "command field 'golden' lacks 'eval-temperature.jsonl'" in reasons[0]
    assert "golden file 'eval-temperature.jsonl' is not the one the manifest signs" in reasons[1]
    (handed,) = settings.incoming_dir.iterdir()
    verified = await verify(handed, [public])
    assert [g.file for g in verified.manifest.golden] == ["eval-temperature.jsonl"]
