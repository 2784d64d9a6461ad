"""Secrets from systemd credentials ($CREDENTIALS_DIRECTORY, LoadCredential=) fill what the file
and the environment leave unset, and TLS files given without `tls = true` are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.config.settings import ConfigError, load
from tests.conftest import MINIMAL_CONFIG as BASE

REPO = Path(__file__).resolve().parent.parent


def test_broker_password_and_tls_files_come_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cloud-broker-password").write_text("cl0ud-s3cret\n")
    (creds / "cloud-broker-ca").write_text("-----BEGIN CERTIFICATE-----\n")
    (creds / "local-broker-password").write_text("l0cal")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = tmp_path / "agent.toml"
    config.write_text(BASE + "[cloud_broker]\ntls = true\nusername = \"gw\"\n")
    settings = load(config)
    assert settings.cloud_broker.password is not None
    assert settings.cloud_broker.password.get_secret_value() == "cl0ud-s3cret"
    assert settings.cloud_broker.ca_file == creds / "cloud-broker-ca"
    assert settings.local_broker.password is not None
    assert settings.local_broker.password.get_secret_value() == "l0cal"
    # the local link is plaintext: a TLS credential for it would be meaningless, none is taken
    assert settings.local_broker.ca_file is None
    assert "cl0ud-s3cret" not in repr(settings)


def test_the_environment_wins_over_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cloud-broker-password").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("EDGE_AGENT_CLOUD_BROKER__PASSWORD", "from-env")
    config = tmp_path / "agent.toml"
    config.write_text(BASE)
    password = load(config).cloud_broker.password
    assert password is not None
    assert password.get_secret_value() == "from-env"


def test_tls_files_without_tls_are_refused_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(BASE + "[cloud_broker]\nca_file = \"ca.pem\"\n")
    with pytest.raises(ConfigError, match=r"cloud_broker: .*ca_file given but tls = false"):
        load(config)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop its own capabilities")
def test_an_unreadable_credentials_directory_is_exit_78_naming_it() -> None:
    """A $CREDENTIALS_DIRECTORY the agent's user cannot read is a clear configuration error
    naming the directory, not an uncaught PermissionError traceback."""
    base = Path(tempfile.mkdtemp(prefix="edge-agent-creds-"))
    try:
        creds = base / "creds"
        creds.mkdir()
        (creds / "cloud-broker-password").write_text("s3cret")
        creds.chmod(0)
        (base / "model.gguf").write_bytes(b"GGUF")
        config = base / "agent.toml"
        config.write_text(BASE)
        config.chmod(0o644)
        env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
        # Root without the capabilities that bypass file modes: the checkout stays readable
        # (root owns it, wherever CI cloned it), the 000 directory does not.
        proc = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
             sys.executable, "-m", "agent", "check-config", str(config)],
            capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    finally:
        creds.chmod(0o700)
        shutil.rmtree(base)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert f"cannot read the credentials directory {creds}" in proc.stderr
    assert "Traceback" not in proc.stderr
