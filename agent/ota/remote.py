"""Model update commands from the cloud broker: `<prefix>/<device_id>/cmd/model`.

Owns that subscription (QoS 1, its own fixed client id `edge-agent-<device_id>-cmd`, a
persistent session, PUBACK only after the command is recorded) and the download it asks for.
A command is JSON: {"manifest": {...}, "signature": "<base64>", "url": "https://..."}, the
manifest and signature being exactly a package's manifest.json and manifest.sig, plus, to go
back to an older version, "rollback": {"directive": {...}, "signature": "<base64>"} (a
package's rollback.json and rollback.sig, agent/ota/directive.py), and for a package with golden
sets "golden": {"<file>": "<its text>", ...} (small JSONL files carried in the command, checked
against the signed manifest's size and sha256 at once). Before anything is downloaded
the signatures must verify with `[ota].trusted_keys`, the version must pass the pipeline's
anti-rollback check (or the directive's) and the size must be within `download_max_bytes`;
a refused command is reported (`command_refused`, with the reason) and acked so it cannot loop.

An accepted command is recorded durably as `incoming/.download-<id>/` (manifest.json,
manifest.sig, command.json), then acked; the downloader fills in the GGUF there
(agent/ota/download.py: bounded, resumable, hash-checked), fsyncs, and renames the complete
package to `incoming/cmd-<id>`, where the watcher hands it to the one pipeline
(agent/ota/updates.py). A record left by a crash or a stop is resumed at the next start. It never
installs anything itself and never touches aiomqtt (agent/transport/mqtt.py), httpx or SQLite
directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.base import durable, signing
from agent.base.errors import StoreFull
from agent.base.retry import Backoff, OutageEvents, OutageLog
from agent.config.settings import Settings
from agent.ota import directive, download, modelpkg
from agent.ota.removal import remove_tree
from agent.ota.updates import Ota
from agent.routing.outbound import Topics
from agent.transport import mqtt

LINK_EVENTS = OutageEvents(
    "model_commands_link_failed", "model_commands_link_failing",
    "model_commands_link_recovered",
)

log = structlog.get_logger()

RECORD = "command.json"
PENDING_PREFIX = ".download-"
MAX_COMMAND_BYTES = 256 * 1024


class CommandRefused(modelpkg.PackageRejected):
    """A model command that must not be downloaded; the message says why."""


def command_id(payload: bytes) -> str:
    """Stable for a redelivery of the same command, so it is recorded once."""
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Command:
    manifest_body: dict[str, Any]
    signature: str
    manifest: modelpkg.Manifest
    url: str
    # The rollback directive's body and signature, and the directive they verify as.
    rollback: tuple[dict[str, Any], str, directive.Directive] | None
    # The golden files the manifest signs for, by file name (their bytes checked).
    golden: dict[str, bytes]


def parse_command(payload: bytes, trusted: list[str]) -> Command:
    """The parts of a command whose signatures verify; CommandRefused says what is wrong."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRefused(f"command of {len(payload)} bytes, at most {MAX_COMMAND_BYTES}")
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise CommandRefused(f"command is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise CommandRefused("command must be a JSON object")
    manifest_body, signature, url = body.get("manifest"), body.get("signature"), body.get("url")
    if not isinstance(manifest_body, dict):
        raise CommandRefused("command field 'manifest' must be the manifest object")
    if not isinstance(signature, str):
        raise CommandRefused("command field 'signature' must be the base64 signature")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise CommandRefused("command field 'url' must be an http:// or https:// URL")
    try:
        signing.verify(modelpkg.canonical(manifest_body), signature, trusted)
    except signing.SignatureError as exc:
        raise CommandRefused(f"command manifest: {exc}") from exc
    manifest = modelpkg.parse_manifest(manifest_body, "command manifest")
    golden = golden_files(body.get("golden"), manifest)
    rollback = body.get("rollback")
    if rollback is None:
        return Command(manifest_body, signature, manifest, url, None, golden)
    if not isinstance(rollback, dict):
        raise CommandRefused("command field 'rollback' must be {\"directive\": {...}, "
                             "\"signature\": \"...\"}")
    allowed_by = directive.parse(rollback.get("directive"), rollback.get("signature"), trusted,
                                 "command")
    return Command(manifest_body, signature, manifest, url,
                   (rollback["directive"], rollback["signature"], allowed_by), golden)


def golden_files(carried: Any, manifest: modelpkg.Manifest) -> dict[str, bytes]:
    """The golden files a command carries, each the size and sha256 the manifest signs;
    CommandRefused naming the file that is missing or differs."""
    if not manifest.golden:
        return {}
    if not isinstance(carried, dict):
        raise CommandRefused("command field 'golden' must map each golden file of the "
                             "manifest to its text")
    files: dict[str, bytes] = {}
    for golden in manifest.golden:
        text = carried.get(golden.file)
        if not isinstance(text, str):
            raise CommandRefused(f"command field 'golden' lacks {golden.file!r}")
        data = text.encode()
        if len(data) != golden.size or hashlib.sha256(data).hexdigest() != golden.sha256:
            raise CommandRefused(f"command golden file {golden.file!r} is not the one the "
                                 "manifest signs (size or sha256)")
        files[golden.file] = data
    return files


class ModelCommands:
    """Receives model commands on the cloud broker and downloads what they name."""

    def __init__(self, settings: Settings, ota: Ota, topics: Topics) -> None:
        self._settings = settings
        self._broker = settings.cloud_broker
        self._ota = ota
        self._topic = topics.model_command
        base = self._broker.client_id or f"edge-agent-{settings.agent.device_id}"
        self.client_id = f"{base}-cmd"
        self._incoming = settings.incoming_dir
        self._pending = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        """Until cancelled; a download cut by the cancel resumes at the next start."""
        if not self._settings.ota.trusted_keys:
            # Updates are off without trusted keys: no subscription, no second cloud session.
            log.info("model_commands_off", reason="no [ota].trusted_keys")
            return
        self._pending.set()  # records left by the previous run
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(), name="model-commands-link")
            tasks.create_task(self._download_pending(), name="model-downloads")

    # -- the subscription -----------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = Backoff(self._broker.reconnect_min_s, self._broker.reconnect_max_s)
        outage = OutageLog(LINK_EVENTS)
        while True:
            try:
                async with mqtt.connect(self._broker, client_id=self.client_id,
                                        persistent_session=True, manual_ack=True,
                                        name="cloud_broker") as link:
                    await link.subscribe([self._topic])
                    outage.recovered()
                    backoff.reset()
                    log.info("model_commands_subscribed", topic=self._topic,
                             client_id=self.client_id)
                    self.subscribed.set()
                    await link.guard(self._receive(link))
            except mqtt.LinkDown as exc:
                outage.failed(exc)
            self.subscribed.clear()
            await asyncio.sleep(backoff.next_delay())

    async def _receive(self, link: mqtt.Link) -> None:
        while True:
            for message in await link.next_batch(16, 0):
                try:
                    await self.record(message.payload)
                except (OSError, StoreFull) as exc:
                    # Not acked: the broker keeps the command and redelivers it on reconnect.
                    raise mqtt.LinkDown(f"model command not recorded: {exc}") from exc
                link.ack_all([message])

    async def record(self, payload: bytes) -> bool:
        """Check a command and record it for download; True if recorded (or already was)."""
        ident = command_id(payload)
        pending = self._incoming / f"{PENDING_PREFIX}{ident}"
        if await asyncio.to_thread(pending.is_dir):
            log.info("model_command_duplicate", id=ident)
            return True
        try:
            command = parse_command(payload, self._settings.ota.trusted_keys)
            manifest = command.manifest
            await asyncio.to_thread(self._ota.check_newer, manifest,
                                    None if command.rollback is None else command.rollback[2])
            limit = self._settings.ota.download_max_bytes
            if manifest.size > limit:
                raise CommandRefused(f"version {manifest.version} declares {manifest.size} "
                                     f"bytes, more than download_max_bytes {limit}")
        except modelpkg.PackageRejected as exc:
            await self._ota.report("command_refused", command=ident, reason=str(exc))
            return False
        await asyncio.to_thread(self._write_record, ident, command)
        await self._ota.report("command_accepted", command=ident, version=manifest.version,
                               name=manifest.name, size=manifest.size, url=command.url,
                               rollback_directive=None if command.rollback is None
                               else command.rollback[2].id)
        self._pending.set()
        return True

    def _write_record(self, ident: str, command: Command) -> None:
        """Write the record under a temp name, fsync, rename: all of it or none of it."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        temp = self._incoming / f".record-{ident}"
        remove_tree(temp, "model command record of an earlier try")
        temp.mkdir()
        durable.write_file(temp / modelpkg.MANIFEST,
               json.dumps(command.manifest_body, indent=2, sort_keys=True).encode())
        durable.write_file(temp / modelpkg.SIGNATURE, command.signature.encode() + b"\n")
        for name, data in command.golden.items():
            durable.write_file(temp / name, data)
        if command.rollback is not None:
            body, signature, _ = command.rollback
            durable.write_file(temp / directive.DIRECTIVE,
                   json.dumps(body, indent=2, sort_keys=True).encode())
            durable.write_file(temp / directive.DIRECTIVE_SIGNATURE, signature.encode() + b"\n")
        durable.write_file(temp / RECORD, json.dumps({"id": ident, "url": command.url}).encode())
        durable.fsync_dir(temp)
        os.replace(temp, self._incoming / f"{PENDING_PREFIX}{ident}")
        durable.fsync_dir(self._incoming)

    # -- the downloads --------------------------------------------------------------------------

    async def _download_pending(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            for entry in await asyncio.to_thread(self._pending_records):
                await self.complete(entry)

    def _pending_records(self) -> list[Path]:
        """The records waiting for their download, oldest name first. Blocking."""
        if not self._incoming.is_dir():
            return []
        return sorted(self._incoming.glob(f"{PENDING_PREFIX}*"))

    async def complete(self, pending: Path) -> bool:
        """Download the GGUF of one record and hand the package over; True if handed over."""
        ident = pending.name.removeprefix(PENDING_PREFIX)
        ota = self._settings.ota
        try:
            url, manifest = await asyncio.to_thread(read_record, pending, ota.trusted_keys)
        except (OSError, ValueError, KeyError, modelpkg.PackageRejected) as exc:
            await self._ota.report("download_failed", command=ident, reason=f"bad record: {exc}")
            await asyncio.to_thread(remove_tree, pending, "unreadable model command record")
            return False
        await self._ota.report("download_started", command=ident, version=manifest.version,
                               url=url, size=manifest.size)
        try:
            fetched = await download.fetch(url, pending / manifest.file, size=manifest.size,
                                           sha256=manifest.sha256,
                                           timeout_s=ota.download_timeout_s,
                                           attempts=ota.download_attempts)
        except (download.DownloadRefused, download.DownloadCut, OSError) as exc:
            await self._ota.report("download_failed", command=ident, version=manifest.version,
                                   reason=str(exc))
            await asyncio.to_thread(remove_tree, pending, "model command record of a failed "
                                    "download")
            return False
        package = self._incoming / f"cmd-{ident}"
        await asyncio.to_thread(self._hand_over, pending, package)
        await self._ota.report("downloaded", command=ident, version=manifest.version,
                               package=package.name, figures={
                                   "bytes": fetched.size, "connections": fetched.connections,
                                   "resumed_from": fetched.resumed_from,
                                   "seconds": round(fetched.seconds, 3),
                                   "rate_bytes_s": round(fetched.rate_bytes_s)})
        self._ota.wake.set()
        return True

    def _hand_over(self, pending: Path, package: Path) -> None:
        durable.fsync_dir(pending)
        remove_tree(package, "downloaded package of an earlier try")
        os.replace(pending, package)
        durable.fsync_dir(self._incoming)


def read_record(pending: Path, trusted: list[str]) -> tuple[str, modelpkg.Manifest]:
    """The URL and the signature-checked manifest of a command record. Blocking."""
    url = json.loads((pending / RECORD).read_bytes())["url"]
    manifest, _ = modelpkg.read_signed(pending, trusted)
    return url, manifest
