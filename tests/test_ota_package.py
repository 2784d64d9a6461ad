"""Model packages on real files: every tampering is refused before llama.cpp could parse the
GGUF, with a message naming the check; versions order as documented; the CLI round-trips."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.base import signing
from agent.base.digest import sha256_file
from agent.ota import directive, modelpkg
from tests.otakit import keypair, package, write_golden


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    work = tmp_path_factory.mktemp("pkg")
    key, public = keypair(work)
    return package(work, key, "2", seed=2), key, public


def copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def gguf_of(directory: Path) -> Path:
    return next(directory.glob("*.gguf"))


def test_a_signed_package_verifies_with_its_key(signed: tuple[Path, Path, str]) -> None:
    pkg, _, public = signed
    verified = modelpkg.verify_blocking(pkg, [public])
    assert verified.manifest.version == "2"
    assert verified.key_id == signing.key_id(public)


def test_a_flipped_byte_is_refused_by_the_hash(signed: tuple[Path, Path, str],
                                               tmp_path: Path) -> None:
    pkg, _, public = signed
    bad = copy(pkg, tmp_path / "flipped")
    data = bytearray(gguf_of(bad).read_bytes())
    data[len(data) // 2] ^= 0x01
    gguf_of(bad).write_bytes(bytes(data))
    with pytest.raises(modelpkg.PackageRejected, match=r"sha256 .* does not match"):
        modelpkg.verify_blocking(bad, [public])


def test_a_truncated_file_is_refused_by_its_size(signed: tuple[Path, Path, str],
                                                 tmp_path: Path) -> None:
    pkg, _, public = signed
    bad = copy(pkg, tmp_path / "truncated")
    os.truncate(gguf_of(bad), gguf_of(bad).stat().st_size - 1000)
    with pytest.raises(modelpkg.PackageRejected, match=r"size .* the manifest says"):
        modelpkg.verify_blocking(bad, [public])


def test_an_unsigned_package_is_refused(signed: tuple[Path, Path, str], tmp_path: Path) -> None:
    pkg, _, public = signed
    bad = copy(pkg, tmp_path / "unsigned")
    (bad / modelpkg.SIGNATURE).unlink()
    with pytest.raises(modelpkg.PackageRejected, match="unsigned package"):
        modelpkg.verify_blocking(bad, [public])


def test_a_package_signed_with_another_key_is_refused(signed: tuple[Path, Path, str],
                                                      tmp_path: Path) -> None:
    pkg, _, _ = signed
    _, other_public = keypair(tmp_path, "other")
    with pytest.raises(modelpkg.PackageRejected, match="does not verify with any trusted key"):
        modelpkg.verify_blocking(pkg, [other_public])


@pytest.mark.parametrize(("field", "value"), [("version", "99"), ("size", 1), ("n_ctx", 4096),
                                              ("canary", [])])
def test_a_manifest_field_edited_after_signing_is_refused(
    signed: tuple[Path, Path, str], tmp_path: Path, field: str, value: object
) -> None:
    pkg, _, public = signed
    bad = copy(pkg, tmp_path / "edited")
    body = json.loads((bad / modelpkg.MANIFEST).read_text())
    body[field] = value
    (bad / modelpkg.MANIFEST).write_text(json.dumps(body))
    with pytest.raises(modelpkg.PackageRejected, match="signature does not verify"):
        modelpkg.verify_blocking(bad, [public])


def test_reformatting_the_manifest_keeps_the_signature_valid(
    signed: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The signature covers the canonical bytes, not the file's whitespace or key order."""
    pkg, _, public = signed
    same = copy(pkg, tmp_path / "reformatted")
    body = json.loads((same / modelpkg.MANIFEST).read_text())
    (same / modelpkg.MANIFEST).write_text(json.dumps(dict(reversed(body.items()))))
    assert modelpkg.verify_blocking(same, [public]).manifest.version == "2"


def test_versions_compare_number_by_number() -> None:
    key = modelpkg.version_key
    assert key("1.10") > key("1.9") > key("1.2.0") == key("1.2") > key("1")
    assert key("2") > key("1.99.99")
    for bad in ("v2", "1..2", "", "1.2-beta", "01x"):
        with pytest.raises(ValueError, match="dotted numbers"):
            key(bad)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "model", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_keygen_sign_verify_round_trip_and_refusal(tmp_path: Path,
                                                       tiny_model: Path) -> None:
    """keygen writes KEY and KEY.pub; sign makes a package; verify exits 0 with the key and 1,
    naming the reason, with another key."""
    assert cli("keygen", str(tmp_path / "k.pem")).returncode == 0
    public = (tmp_path / "k.pem.pub").read_text().strip()
    signed = cli("sign", str(tiny_model), "--name", "t", "--version", "3", "--key",
                 str(tmp_path / "k.pem"), "--out", str(tmp_path / "pkg"))
    assert signed.returncode == 0, signed.stderr
    assert cli("verify", str(tmp_path / "pkg"), "--trusted-key", public).returncode == 0
    cli("keygen", str(tmp_path / "other.pem"))
    other = (tmp_path / "other.pem.pub").read_text().strip()
    refused = cli("verify", str(tmp_path / "pkg"), "--trusted-key", other)
    assert refused.returncode == 1
    assert "does not verify with any trusted key" in refused.stderr
    assert cli("keygen", str(tmp_path / "k.pem")).returncode == 1, "overwrote a private key"


# -- rollback directives ---------------------------------------------------------------------


def manifest_of(pkg: Path, public: str) -> modelpkg.Manifest:
    return modelpkg.read_signed(pkg, [public])[0]


def test_a_rollback_directive_names_one_package_device_and_expiry(
    signed: tuple[Path, Path, str]
) -> None:
    """A directive made for a package verifies with the trusted key and allows exactly that
    package, on the devices it names, until it expires; any other package, device or time is
    refused with a message naming the mismatch."""
    pkg, key, public = signed
    manifest = manifest_of(pkg, public)
    body, signature = directive.make(manifest, devices=["gw-1", "gw-2"], valid_for_s=3600,
                                     reason="2 is the last good model", key=key)
    allowed = directive.parse(body, signature, [public], "test")
    assert allowed.key_id == signing.key_id(public)
    now = body["issued_at"] + 10
    directive.check(allowed, manifest, "gw-2", now)
    with pytest.raises(modelpkg.PackageRejected, match="not for device 'gw-3'"):
        directive.check(allowed, manifest, "gw-3", now)
    with pytest.raises(modelpkg.PackageRejected, match="expired at"):
        directive.check(allowed, manifest, "gw-1", body["expires_at"] + 1)
    other = dataclasses.replace(manifest, sha256="ab" * 32)
    with pytest.raises(modelpkg.PackageRejected, match="not this package"):
        directive.check(allowed, other, "gw-1", now)
    everyone, sig = directive.make(manifest, devices=["*"], valid_for_s=60, reason="r", key=key)
    directive.check(directive.parse(everyone, sig, [public], "test"), manifest, "any", now)


def test_an_edited_or_foreign_rollback_directive_is_refused(
    signed: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """Widening the devices or the expiry after signing breaks the signature; a directive
    signed by a key the agent does not trust is refused the same way."""
    pkg, key, public = signed
    manifest = manifest_of(pkg, public)
    body, signature = directive.make(manifest, devices=["gw-1"], valid_for_s=60,
                                     reason="r", key=key)
    for edit in ({"devices": ["*"]}, {"expires_at": body["expires_at"] + 86400}):
        with pytest.raises(modelpkg.PackageRejected, match="does not verify"):
            directive.parse({**body, **edit}, signature, [public], "test")
    stranger, _ = keypair(tmp_path, "stranger")
    body, signature = directive.make(manifest, devices=["gw-1"], valid_for_s=60,
                                     reason="r", key=stranger)
    with pytest.raises(modelpkg.PackageRejected, match="does not verify"):
        directive.parse(body, signature, [public], "test")
    with pytest.raises(modelpkg.PackageRejected, match="no signature"):
        directive.parse(body, None, [public], "test")


def test_cli_allow_rollback_writes_a_directive_that_verify_shows(
    signed: tuple[Path, Path, str], tmp_path: Path
) -> None:
    pkg, key, public = signed
    work = copy(pkg, tmp_path / "pkg")
    made = cli("allow-rollback", str(work), "--key", str(key), "--device", "gw-7",
               "--valid-for-h", "2", "--reason", "4 misreads frost")
    assert made.returncode == 0, made.stderr
    shown = cli("verify", str(work), "--trusted-key", public)
    assert shown.returncode == 0, shown.stderr
    assert "rollback directive" in shown.stdout
    assert "gw-7" in shown.stdout
    assert "4 misreads frost" in shown.stdout
    allowed = directive.read(work, [public])
    assert allowed is not None
    assert allowed.devices == ("gw-7",)
    assert 7190 < allowed.expires_at - time.time() <= 7200
    printed = json.loads(cli("command", str(work), "--url", "http://x/m.gguf").stdout)
    assert printed["rollback"]["directive"]["version"] == "2"
    assert printed["signature"] == (pkg / modelpkg.SIGNATURE).read_text().strip()


# -- golden sets -----------------------------------------------------------------------------

GOLDEN_ITEMS = [("sensors/s1/temperature", {"sensor": "s1", "celsius": c},
                 {"level": "normal" if c < 60 else "critical"}) for c in (20, 45, 70, 95)]


@pytest.fixture(scope="module")
def with_golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("golden-pkg")
    key, public = keypair(work)
    golden = write_golden(work / "eval" / "eval-temperature.jsonl", GOLDEN_ITEMS)
    return package(work, key, "3", seed=3, golden=[("temperature", golden, 0.9)]), public


def test_a_package_carries_its_golden_set_signed_with_size_and_sha256(
    with_golden: tuple[Path, str]
) -> None:
    pkg, public = with_golden
    manifest = modelpkg.verify_blocking(pkg, [public]).manifest
    (golden,) = manifest.golden
    assert (golden.route, golden.file, golden.min_accuracy) == (
        "temperature", "eval-temperature.jsonl", 0.9)
    assert golden.size == (pkg / golden.file).stat().st_size
    assert golden.sha256 == sha256_file(pkg / golden.file)
    items = modelpkg.load_golden(pkg / golden.file)
    assert [(i.topic, json.loads(i.payload), i.expected) for i in items] == GOLDEN_ITEMS
    assert modelpkg.package_files(manifest) == [manifest.file, "eval-temperature.jsonl"]


def test_a_package_without_golden_sets_stays_valid(signed: tuple[Path, Path, str]) -> None:
    pkg, _, public = signed
    assert "golden" not in json.loads((pkg / modelpkg.MANIFEST).read_text())
    assert modelpkg.verify_blocking(pkg, [public]).manifest.golden == ()


def test_an_edited_golden_file_is_refused_by_its_sha256_naming_it(
    with_golden: tuple[Path, str], tmp_path: Path
) -> None:
    """Same size, one expected answer changed: the hash catches it, before the GGUF is read."""
    pkg, public = with_golden
    bad = copy(pkg, tmp_path / "tampered")
    path = bad / "eval-temperature.jsonl"
    text = path.read_text()
    edited = text.replace('"critical"', '"warning!"', 1)
    assert len(edited) == len(text)
    assert edited != text
    path.write_text(edited)
    gguf_of(bad).write_bytes(b"")  # were the GGUF looked at first, its size would fail
    with pytest.raises(modelpkg.PackageRejected,
                       match=r"eval-temperature\.jsonl: sha256 .* does not match"):
        modelpkg.verify_blocking(bad, [public])
    path.write_text(text + "\n")
    with pytest.raises(modelpkg.PackageRejected,
                       match=r"eval-temperature\.jsonl: size .* the manifest says"):
        modelpkg.verify_blocking(bad, [public])
    path.unlink()
    with pytest.raises(modelpkg.PackageRejected,
                       match=r"eval-temperature\.jsonl: cannot read the golden file"):
        modelpkg.verify_blocking(bad, [public])


@pytest.mark.parametrize(("entry", "problem"), [
    ({"file": "../x.jsonl"}, "plain \\*.jsonl file name"),
    ({"file": "manifest.json"}, "plain \\*.jsonl file name"),
    ({"min_accuracy": 1.5}, "'min_accuracy' must be a number from 0 to 1"),
    ({"min_accuracy": None}, "'min_accuracy' must be a number from 0 to 1"),
    ({"route": 3}, "'route' must be str"),
])
def test_a_bad_golden_entry_is_refused_naming_the_field(
    with_golden: tuple[Path, str], entry: dict[str, object], problem: str
) -> None:
    pkg, _ = with_golden
    body = json.loads((pkg / modelpkg.MANIFEST).read_text())
    body["golden"][0].update(entry)
    with pytest.raises(modelpkg.PackageRejected, match=f"golden\\[0\\].*{problem}"):
        modelpkg.parse_manifest(body, "m.json")


def test_a_golden_file_that_does_not_parse_is_refused_at_signing(tmp_path: Path,
                                                                 tiny_model: Path) -> None:
    key, _ = keypair(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"topic": "t", "reading": {}, "output": {}}\n{"topic": "t"}\n')
    with pytest.raises(modelpkg.PackageRejected, match=r"bad\.jsonl:2: needs 'topic'"):
        modelpkg.build(tiny_model, tmp_path / "pkg", name="t", version="1", n_ctx=512,
                       canary=[], key=key, golden=[("temperature", bad, 0.9)])
    assert not (tmp_path / "pkg").exists()


def test_cli_sign_with_golden_sets(tmp_path: Path, tiny_model: Path) -> None:
    assert cli("keygen", str(tmp_path / "k.pem")).returncode == 0
    public = (tmp_path / "k.pem.pub").read_text().strip()
    golden = write_golden(tmp_path / "eval.jsonl", GOLDEN_ITEMS)
    signed = cli("sign", str(tiny_model), "--name", "t", "--version", "3", "--key",
                 str(tmp_path / "k.pem"), "--out", str(tmp_path / "pkg"),
                 "--golden", f"temperature={golden}", "--min-accuracy", "0.97")
    assert signed.returncode == 0, signed.stderr
    assert "golden eval.jsonl for route temperature (floor 0.97)" in signed.stdout
    manifest = modelpkg.verify_blocking(tmp_path / "pkg", [public]).manifest
    assert [(g.route, g.file, g.min_accuracy) for g in manifest.golden] == [
        ("temperature", "eval.jsonl", 0.97)]
    bad = cli("sign", str(tiny_model), "--name", "t", "--version", "3", "--key",
              str(tmp_path / "k.pem"), "--out", str(tmp_path / "pkg2"), "--golden", "eval.jsonl")
    assert bad.returncode == 1
    assert "--golden 'eval.jsonl' is not ROUTE=FILE" in bad.stderr
