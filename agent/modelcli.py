"""`edge-agent model ...`: the operator's commands for model packages.

keygen, sign and verify work on files only. list, install and rollback are safe while the agent
runs because none of them changes what the agent is serving directly: `list` reads the state
file (replaced atomically, so never half-written); `install` verifies the package, copies it
into incoming/ under a hidden name and renames it into place, so the agent only ever sees a
complete package; `rollback` durably writes ota/rollback.request, which the running agent (or
the next start) acts on, reporting the outcome like any other update step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from agent import config, modelpkg, signing
from agent.errors import EXIT_CONFIG, ConfigError
from agent.otastate import ModelStore, durable_write, fsync_dir


def add_parser(commands: Any) -> None:
    model = commands.add_parser("model", help="model packages: keygen, sign, verify, list, "
                                "install, rollback")
    sub = model.add_subparsers(dest="model_command", required=True)
    keygen = sub.add_parser("keygen", help="make an ed25519 signing key (KEY and KEY.pub)")
    keygen.add_argument("key", type=Path)
    sign = sub.add_parser("sign", help="make a signed package directory from a GGUF file")
    sign.add_argument("gguf", type=Path)
    sign.add_argument("--name", required=True)
    sign.add_argument("--version", required=True, help="dotted numbers, e.g. 3 or 1.2.0")
    sign.add_argument("--key", type=Path, required=True, help="private key from keygen")
    sign.add_argument("--out", type=Path, required=True, help="the package directory to write")
    sign.add_argument("--n-ctx", type=int, default=2048)
    sign.add_argument("--canary", type=Path, default=None,
                      help='JSON file: [{"route": ..., "payload": {...}, "max_latency_ms": N}]')
    sign.add_argument("--min-agent-version", default=None)
    verify = sub.add_parser("verify", help="check a package's signature, size and sha256")
    verify.add_argument("package", type=Path)
    verify.add_argument("--config", type=Path, help="trust the keys of this agent config")
    verify.add_argument("--trusted-key", action="append", default=[],
                        help="a trusted public key (base64); may repeat")
    for name, text in (("list", "installed, active, previous and failed models"),
                       ("install", "hand a package to the agent through incoming/"),
                       ("rollback", "ask the agent to go back to the previous model")):
        cmd = sub.add_parser(name, help=text)
        if name == "install":
            cmd.add_argument("package", type=Path)
        cmd.add_argument("--config", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.model_command](args)
    except ConfigError as exc:
        print(f"edge-agent: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (modelpkg.PackageRejected, signing.SignatureError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1


def _keygen(args: argparse.Namespace) -> int:
    public = signing.generate(args.key)
    pub_path = args.key.with_name(args.key.name + ".pub")
    pub_path.write_text(public + "\n")
    print(f"private key {args.key} (keep it off the gateways); public key {pub_path}:")
    print(public)
    return 0


def _sign(args: argparse.Namespace) -> int:
    canary = json.loads(args.canary.read_text()) if args.canary else []
    manifest = modelpkg.build(args.gguf, args.out, name=args.name, version=args.version,
                              n_ctx=args.n_ctx, canary=canary, key=args.key,
                              min_agent_version=args.min_agent_version)
    print(f"{args.out}: {manifest.name} {manifest.version} sha256 {manifest.sha256} "
          f"signed by {signing.key_id(signing.public_key_of(args.key))}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    trusted = list(args.trusted_key)
    if args.config is not None:
        trusted += config.load(args.config).ota.trusted_keys
    package = modelpkg.verify_blocking(args.package, trusted)
    print(f"{args.package}: ok ({package.manifest.name} {package.manifest.version}, "
          f"key {package.key_id})")
    return 0


def _list(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    state = ModelStore(settings.ota_dir).read()
    print(json.dumps(state.to_json(), indent=2, sort_keys=True))
    return 0


def _install(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    package = modelpkg.verify_blocking(args.package, settings.ota.trusted_keys)
    manifest = package.manifest
    incoming = settings.incoming_dir
    incoming.mkdir(parents=True, exist_ok=True)
    final = incoming / f"{manifest.name}-{manifest.version}"
    hidden = incoming / f".install-{manifest.name}-{manifest.version}-{os.getpid()}"
    shutil.rmtree(hidden, ignore_errors=True)
    hidden.mkdir()
    for name in (manifest.file, modelpkg.MANIFEST, modelpkg.SIGNATURE):
        with (args.package / name).open("rb") as src, (hidden / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    fsync_dir(hidden)
    os.replace(hidden, final)
    fsync_dir(incoming)
    print(f"{final}: handed to the agent; follow its log or `edge-agent model list`")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    store = ModelStore(settings.ota_dir)
    store.ensure()
    durable_write(store.rollback_request, b"rollback\n")
    print(f"{store.rollback_request}: the agent rolls back to {store.read().previous} "
          "(now, or at its next start)")
    return 0


_COMMANDS = {"keygen": _keygen, "sign": _sign, "verify": _verify, "list": _list,
             "install": _install, "rollback": _rollback}
