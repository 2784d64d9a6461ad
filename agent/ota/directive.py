"""Signed rollback directives: the one way an older (or once failed) version gets past
anti-rollback.

Anti-rollback stops a replayed old package, however validly signed, from putting a known-bad
model back on a gateway. Going back on purpose therefore needs a second, fresh signature: a
directive naming exactly one package (name, version, the GGUF's sha256), the devices it is for
(or "*"), and when it expires. It lives beside the package as `rollback.json` and
`rollback.sig` (written by `edge-agent model allow-rollback`), or travels in a cloud command's
`rollback` field. A gateway uses a directive once: its id is recorded in ota/state.json when
the package is staged, so replaying it later is refused.

Owns the directive's format and checks; agent/ota/updates.py decides when one is needed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.base import signing
from agent.ota import modelpkg
from agent.ota.modelpkg import PackageRejected

DIRECTIVE = "rollback.json"
DIRECTIVE_SIGNATURE = "rollback.sig"
KIND = "rollback"
ALL_DEVICES = "*"


@dataclass(frozen=True, slots=True)
class Directive:
    """A verified rollback directive; `id` names it in reports and in the state file."""

    id: str
    name: str
    version: str
    sha256: str
    devices: tuple[str, ...]
    expires_at: float
    reason: str
    key_id: str

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "key_id": self.key_id, "reason": self.reason,
                "expires_at": self.expires_at, "devices": list(self.devices)}


def make(manifest: modelpkg.Manifest, *, devices: list[str], valid_for_s: float, reason: str,
         key: Path) -> tuple[dict[str, Any], str]:
    """(body, base64 signature) of a directive allowing `manifest`'s package back."""
    if not devices:
        raise ValueError("a rollback directive needs at least one device id, or '*' for all")
    if valid_for_s <= 0:
        raise ValueError("a rollback directive must be valid for a positive time")
    now = time.time()
    body: dict[str, Any] = {
        "format": modelpkg.FORMAT, "kind": KIND, "name": manifest.name,
        "version": manifest.version, "sha256": manifest.sha256, "devices": sorted(devices),
        "issued_at": round(now, 3), "expires_at": round(now + valid_for_s, 3), "reason": reason,
    }
    return body, signing.sign(modelpkg.canonical(body), key)


def parse(body: Any, signature: Any, trusted: list[str], where: str) -> Directive:
    """Check the signature and the fields; PackageRejected naming what is wrong."""
    if not isinstance(body, dict):
        raise PackageRejected(f"{where}: a rollback directive must be a JSON object")
    if not isinstance(signature, str):
        raise PackageRejected(f"{where}: the rollback directive has no signature")
    try:
        key = signing.verify(modelpkg.canonical(body), signature, trusted)
    except signing.SignatureError as exc:
        raise PackageRejected(f"{where}: rollback directive: {exc}") from exc
    if body.get("format") != modelpkg.FORMAT or body.get("kind") != KIND:
        raise PackageRejected(f"{where}: fields 'format' and 'kind' must be "
                              f"{modelpkg.FORMAT} and {KIND!r}")
    devices = body.get("devices")
    if (not isinstance(devices, list) or not devices
            or not all(isinstance(d, str) and d for d in devices)):
        raise PackageRejected(f"{where}: field 'devices' must list device ids (or '*')")
    expires_at = body.get("expires_at")
    if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
        raise PackageRejected(f"{where}: field 'expires_at' must be a unix time")
    fields = {key: body.get(key) for key in ("name", "version", "sha256", "reason")}
    for field, value in fields.items():
        if not isinstance(value, str):
            raise PackageRejected(f"{where}: field {field!r} must be a string")
    ident = hashlib.sha256(modelpkg.canonical(body)).hexdigest()[:16]
    return Directive(ident, str(fields["name"]), str(fields["version"]), str(fields["sha256"]),
                     tuple(devices), float(expires_at), str(fields["reason"]), key)


def read(directory: Path, trusted: list[str]) -> Directive | None:
    """The directive beside a package, or None if it has none (a broken one is refused)."""
    body_path = directory / DIRECTIVE
    if not body_path.exists():
        return None
    try:
        body = json.loads(body_path.read_bytes())
        signature = (directory / DIRECTIVE_SIGNATURE).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackageRejected(f"{body_path}: unreadable rollback directive or signature: "
                              f"{exc}") from exc
    except ValueError as exc:
        raise PackageRejected(f"{body_path}: not JSON: {exc}") from exc
    return parse(body, signature, trusted, str(body_path))


def write(directory: Path, body: dict[str, Any], signature: str) -> None:
    (directory / DIRECTIVE).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    (directory / DIRECTIVE_SIGNATURE).write_text(signature.strip() + "\n")


def check(directive: Directive, manifest: modelpkg.Manifest, device_id: str,
          now: float) -> None:
    """Does `directive` allow this package on this device now? PackageRejected if not."""
    check_binding(directive, manifest)
    if ALL_DEVICES not in directive.devices and device_id not in directive.devices:
        raise PackageRejected(f"rollback directive {directive.id} is not for device "
                              f"{device_id!r} (it names {', '.join(directive.devices)})")
    if now > directive.expires_at:
        raise PackageRejected(
            f"rollback directive {directive.id} expired at {directive.expires_at:.0f} "
            f"(unix time; this gateway's clock says {now:.0f})")


def check_binding(directive: Directive, manifest: modelpkg.Manifest) -> None:
    """Does `directive` name exactly this package? PackageRejected if not."""
    named = (directive.name, directive.version, directive.sha256)
    if named != (manifest.name, manifest.version, manifest.sha256):
        raise PackageRejected(
            f"rollback directive {directive.id} names {directive.name} {directive.version} "
            f"sha256 {directive.sha256[:12]}…, not this package ({manifest.name} "
            f"{manifest.version} sha256 {manifest.sha256[:12]}…)")
