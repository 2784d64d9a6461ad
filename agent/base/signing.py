"""ed25519 signatures over model manifests: the only module that imports `cryptography`.

Owns key generation, signing and verification, and the text forms of keys: a private key is an
unencrypted PKCS#8 PEM file (mode 0600, kept by the operator, never on a gateway); a public key
is the base64 of its 32 raw bytes, which is what `[ota].trusted_keys` lists. It knows nothing
about manifests beyond the bytes it is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.base.errors import PermanentError


class SignatureError(PermanentError):
    """A signature, key or key file is unusable, or no trusted key made the signature."""


def key_id(public_key_b64: str) -> str:
    """A short, stable name for a public key, for logs and reports."""
    return hashlib.sha256(public_key_b64.strip().encode()).hexdigest()[:12]


def generate(private_path: Path) -> str:
    """Write a new private key (PEM, 0600, refuses to overwrite) and return its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return _public_text(key.public_key())


def _public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _load_private(private_path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except OSError as exc:
        raise SignatureError(f"{private_path}: cannot read the key: {exc.strerror}") from exc
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{private_path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{private_path}: not an ed25519 key")
    return key


def public_key_of(private_path: Path) -> str:
    return _public_text(_load_private(private_path).public_key())


def sign(data: bytes, private_path: Path) -> str:
    """The base64 ed25519 signature of `data` with the key in `private_path`."""
    return base64.b64encode(_load_private(private_path).sign(data)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from its base64 text; SignatureError if it is not 32 raw ed25519 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("public key is not base64") from exc
    if len(raw) != 32:
        raise SignatureError(f"public key has {len(raw)} bytes, an ed25519 key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(data: bytes, signature_b64: str, trusted: Sequence[str]) -> str:
    """Return the id of the trusted key that signed `data`; SignatureError if none did."""
    if not trusted:
        raise SignatureError("no trusted keys are configured ([ota].trusted_keys)")
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("signature is not base64") from exc
    for text in trusted:
        try:
            parse_public_key(text).verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(text)
    raise SignatureError("signature does not verify with any trusted key")
