"""`edge-agent model ...`: the operator's commands for model packages.

keygen, sign, allow-rollback, verify and command work on files only, and so does specialize (it
trains and evaluates a student model for one route, from labels, a rule or a teacher model's
answers, and with --package-key signs a package of it whose golden set is its held-out set:
agent/specialize/, imported only when it
runs, with the optional [train] extra's torch and gguf) (allow-rollback adds a
signed rollback directive to a package, agent/ota/directive.py; command prints the JSON to publish
on the cloud broker's cmd/model topic). list, install and rollback are safe while the agent
runs because none of them changes what the agent is serving directly: `list` reads the state
file (replaced atomically, so never half-written); `install` verifies the package, copies it
into incoming/ under a hidden name, gives it to the agent's user (when run as root) and renames
it into place, so the agent only ever sees a complete package it can remove; `rollback`
durably writes ota/rollback.request, which the running agent (or the next start) acts on,
reporting the outcome like any other update step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.base import durable, signing
from agent.base.errors import EXIT_CONFIG, ConfigError
from agent.config.settings import load
from agent.ota import directive, modelpkg
from agent.ota.state import ModelStore

if TYPE_CHECKING:
    from agent.specialize.teacher import Teacher


def add_parser(commands: Any) -> None:
    model = commands.add_parser("model", help="model packages: keygen, sign, allow-rollback, "
                                "verify, command, list, install, rollback; specialize")
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
    sign.add_argument("--golden", action="append", default=[], metavar="ROUTE=FILE",
                      help="a golden set for ROUTE: JSONL of {\"topic\", \"reading\", "
                      "\"output\"} per line (specialize's eval.jsonl); may repeat")
    sign.add_argument("--min-accuracy", type=float, default=0.95,
                      help="the accuracy floor of each --golden set (default 0.95)")
    allow = sub.add_parser("allow-rollback", help="sign a rollback directive into a package, "
                           "letting its (older or failed) version past anti-rollback")
    allow.add_argument("package", type=Path)
    allow.add_argument("--key", type=Path, required=True, help="private key from keygen")
    allow.add_argument("--device", action="append", default=[],
                       help="a device id it is for (may repeat); '*' for every device")
    allow.add_argument("--valid-for-h", type=float, default=24.0,
                       help="hours until the directive expires (default 24)")
    allow.add_argument("--reason", required=True, help="why, for the reports")
    command = sub.add_parser("command", help="print the cloud command (JSON) that installs a "
                             "package whose GGUF is served at URL")
    command.add_argument("package", type=Path)
    command.add_argument("--url", required=True)
    verify = sub.add_parser("verify", help="check a package's signature, size and sha256")
    verify.add_argument("package", type=Path)
    verify.add_argument("--config", type=Path, help="trust the keys of this agent config")
    verify.add_argument("--trusted-key", action="append", default=[],
                        help="a trusted public key (base64); may repeat")
    for name, text in (("list", "installed, active, previous and failed models, one line each "
                               "(--json: the raw state)"),
                       ("install", "hand a package to the agent through incoming/"),
                       ("rollback", "ask the agent to go back to the previous model")):
        cmd = sub.add_parser(name, help=text)
        if name == "install":
            cmd.add_argument("package", type=Path)
        if name == "list":
            cmd.add_argument("--json", action="store_true",
                             help="print the OTA state file (ota/state.json) as it is")
        cmd.add_argument("--config", type=Path, required=True)
    _add_specialize(sub)


def _add_specialize(sub: Any) -> None:
    spec = sub.add_parser(
        "specialize", help="train a small model for one route from labels, a rule or a teacher "
        "model's answers, quantize it and evaluate every file on a held-out set (needs the "
        "[train] extra)")
    spec.add_argument("--config", type=Path, required=True, help="the agent's configuration")
    spec.add_argument("--route", required=True, help="the route to specialize for")
    source = spec.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path,
                        help='JSONL: {"reading": {...}, "output": {...}} per line')
    source.add_argument("--rule", help="a labelling rule for synthetic readings, e.g. "
                        "'celsius<60:normal,celsius<85:warning,else:critical'; for a windowed "
                        "route, of the window: 'mean(rms)>7.1 or rise(rms)>3:true,else:false'")
    source.add_argument("--teacher", metavar="URL", help="an OpenAI-compatible endpoint "
                        "(base URL including /v1) whose model labels the readings of "
                        "--readings, or synthetic ones over --range (knowledge distillation)")
    spec.add_argument("--range", dest="span", default=None, metavar="LO:HI",
                      help="with --rule: the values synthetic readings cover (default: three "
                      "times the thresholds' spread either side); with --teacher: the range "
                      "of synthetic readings of --field")
    teacher = spec.add_argument_group("teacher (with --teacher)")
    teacher.add_argument("--readings", type=Path, default=None,
                         help='JSONL: {"topic": ..., "reading": {...}} per line for the '
                         "teacher to label (any output is ignored: `queue export` files do)")
    teacher.add_argument("--field", default=None, help="with --range: the numeric field of "
                         "the synthetic readings (default: the input_schema's one number)")
    teacher.add_argument("--teacher-model", default="", help="the model name sent")
    teacher.add_argument("--teacher-key-file", type=Path, default=None,
                         help="a file holding the bearer token")
    teacher.add_argument("--teacher-format", choices=("json_schema", "json_object"),
                         default="json_schema", help="how the output_schema is sent, as "
                         "[cloud_model] response_format (json_object for llama-cpp-python's "
                         "server)")
    teacher.add_argument("--teacher-concurrency", type=int, default=4,
                         help="requests in flight (default 4)")
    teacher.add_argument("--teacher-timeout", type=float, default=60.0,
                         help="seconds per request (default 60)")
    spec.add_argument("--out", type=Path, required=True, help="the directory to write")
    spec.add_argument("--steps", type=int, default=None, help="training steps")
    spec.add_argument("--seed", type=int, default=None)
    spec.add_argument("--train-examples", type=int, default=None,
                      help="with --rule (or --teacher and --range): synthetic training "
                      "readings")
    spec.add_argument("--eval-examples", type=int, default=None,
                      help="held-out readings (a fifth of a labels file at most)")
    spec.add_argument("--threads", type=int, default=2,
                      help="training threads (evaluation uses the [model] section's)")
    spec.add_argument("--base", type=Path, default=None,
                      help="a GGUF to evaluate beside the student (e.g. the pretrained base)")
    spec.add_argument("--from-base", type=Path, default=None, metavar="GGUF",
                      help="fine-tune this pretrained llama GGUF with LoRA (its own tokenizer "
                      "and chat template) instead of training a student from scratch")
    package = spec.add_argument_group(
        "package (with --package-key): <out>/package/, signed as by `model sign`, with "
        "eval.jsonl as the route's golden set")
    package.add_argument("--package-key", type=Path, default=None, metavar="KEY",
                         help="private key from keygen: sign a package of the student")
    package.add_argument("--package-version", default=None, metavar="V",
                         help="its version, dotted numbers (with --package-key)")
    package.add_argument("--package-name", default=None,
                         help="its name (default <route>-student)")
    package.add_argument("--package-quant", default="q8_0",
                         choices=("f32", "f16", "q8_0", "q4_0"),
                         help="the file packaged (default q8_0)")
    package.add_argument("--min-accuracy", type=float, default=None,
                         help="the golden set's floor; under it nothing is packaged and the "
                         "command fails (default: the file's measured accuracy less 0.02)")


def _specialize(args: argparse.Namespace) -> int:
    teacher = _teacher(args)  # before the [train] extra's check: a usage error comes first
    package = _packaging(args)
    try:
        from agent.specialize import run as specialize
        from agent.specialize.recipe import Recipe
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "gguf", "numpy", "llama_cpp"):
            print(f"edge-agent: model specialize needs the [train] extra "
                  f"(pip install 'edge-agent[train]'): no module named {exc.name!r}",
                  file=sys.stderr)
            return 1
        raise
    overrides = {key: getattr(args, key) for key in ("steps", "seed", "train_examples",
                                                      "eval_examples")
                 if getattr(args, key) is not None}
    span = None
    if args.span is not None:
        try:
            low, high = (float(x) for x in args.span.split(":"))
        except ValueError:
            print(f"edge-agent: --range {args.span!r} is not LO:HI", file=sys.stderr)
            return 2
        span = (low, high)
    request = specialize.Request(
        config=args.config, route=args.route, out=args.out, labels=args.labels, rule=args.rule,
        span=span, threads=args.threads, base=args.base, teacher=teacher,
        package=None if package is None else specialize.Packaging(**package))
    if args.from_base is not None:
        from agent.specialize import finetune

        if request.package is not None:
            raise ValueError("--package-key does not go with --from-base yet: package the "
                             "fine-tuned file with `model sign`")
        finetune.fine_tune(request, args.from_base, finetune.Plan(**overrides))
        return 0
    specialize.specialize(replace(request, recipe=Recipe(**overrides)))
    return 0


def _packaging(args: argparse.Namespace) -> dict[str, Any] | None:
    """The Packaging fields of --package-key and its options, checked before any training: a
    ValueError names an option given without the others, a bad version or floor, a missing
    key."""
    if args.package_key is None:
        given = [f"--{key.replace('_', '-')}" for key in ("package_version", "package_name",
                                                          "min_accuracy")
                 if getattr(args, key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only go with --package-key KEY")
        return None
    if args.package_version is None:
        raise ValueError("--package-key needs --package-version V")
    modelpkg.version_key(args.package_version)
    if args.min_accuracy is not None and not 0.0 <= args.min_accuracy <= 1.0:
        raise ValueError(f"--min-accuracy {args.min_accuracy:g} is not between 0 and 1")
    signing.public_key_of(args.package_key)  # a missing or bad key fails now, not after training
    return {"key": args.package_key, "version": args.package_version,
            "quant": args.package_quant, "name": args.package_name,
            "min_accuracy": args.min_accuracy}


def _teacher(args: argparse.Namespace) -> Teacher | None:
    """The Teacher of --teacher and its options; a ValueError names an option given without
    it (they would be silently ignored)."""
    from agent.specialize.teacher import Teacher

    given = [f"--{key.replace('_', '-')}" for key in ("readings", "field", "teacher_key_file")
             if getattr(args, key) is not None] + (["--teacher-model"] if args.teacher_model
                                                   else [])
    if args.teacher is None:
        if given:
            raise ValueError(f"{', '.join(given)} only go with --teacher URL")
        return None
    if args.readings is not None and args.span is not None:
        raise ValueError("--teacher labels --readings FILE or synthetic readings over "
                         "--range LO:HI: give one")
    if args.field is not None and args.span is None:
        raise ValueError("--field names the field of synthetic readings: it goes with --range")
    if not args.teacher.startswith(("http://", "https://")):
        raise ValueError(f"--teacher {args.teacher!r} is not an http:// or https:// URL")
    if args.teacher_concurrency < 1 or args.teacher_timeout <= 0:
        raise ValueError("--teacher-concurrency must be at least 1 and --teacher-timeout "
                         "positive")
    return Teacher(url=args.teacher, model=args.teacher_model, key_file=args.teacher_key_file,
                   response_format=args.teacher_format, concurrency=args.teacher_concurrency,
                   timeout_s=args.teacher_timeout, readings=args.readings, field=args.field)


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
    golden: list[tuple[str, Path, float]] = []
    for spec in args.golden:
        route, sep, file = spec.partition("=")
        if not sep or not route or not file:
            raise ValueError(f"--golden {spec!r} is not ROUTE=FILE")
        golden.append((route, Path(file), args.min_accuracy))
    manifest = modelpkg.build(args.gguf, args.out, name=args.name, version=args.version,
                              n_ctx=args.n_ctx, canary=canary, key=args.key,
                              min_agent_version=args.min_agent_version, golden=golden)
    print(f"{args.out}: {manifest.name} {manifest.version} sha256 {manifest.sha256} "
          f"signed by {signing.key_id(signing.public_key_of(args.key))}"
          + "".join(f"; golden {g.file} for route {g.route} (floor {g.min_accuracy:g})"
                    for g in manifest.golden))
    return 0


def _verify(args: argparse.Namespace) -> int:
    trusted = list(args.trusted_key)
    if args.config is not None:
        trusted += load(args.config).ota.trusted_keys
    package = modelpkg.verify_blocking(args.package, trusted)
    print(f"{args.package}: ok ({package.manifest.name} {package.manifest.version}, "
          f"key {package.key_id})")
    allowed_by = directive.read(args.package, trusted)
    if allowed_by is not None:
        directive.check_binding(allowed_by, package.manifest)
        left_h = (allowed_by.expires_at - time.time()) / 3600
        print(f"{args.package}: rollback directive {allowed_by.id} for "
              f"{', '.join(allowed_by.devices)}, "
              + (f"valid {left_h:.1f} h more" if left_h > 0 else "EXPIRED")
              + f" (key {allowed_by.key_id}): {allowed_by.reason}")
    return 0


def _allow_rollback(args: argparse.Namespace) -> int:
    manifest, _ = modelpkg.read_signed(args.package, [signing.public_key_of(args.key)])
    body, signature = directive.make(manifest, devices=args.device,
                                     valid_for_s=args.valid_for_h * 3600, reason=args.reason,
                                     key=args.key)
    directive.write(args.package, body, signature)
    print(f"{args.package}: rollback to {manifest.name} {manifest.version} allowed on "
          f"{', '.join(body['devices'])} for {args.valid_for_h:g} h")
    return 0


def _command(args: argparse.Namespace) -> int:
    manifest = json.loads((args.package / modelpkg.MANIFEST).read_bytes())
    body: dict[str, Any] = {
        "manifest": manifest,
        "signature": (args.package / modelpkg.SIGNATURE).read_text().strip(),
        "url": args.url,
    }
    golden = manifest.get("golden") if isinstance(manifest, dict) else None
    if golden:  # small JSONL files: carried in the command, checked against the manifest
        body["golden"] = {entry["file"]: (args.package / entry["file"]).read_text("utf-8")
                          for entry in golden}
    if (args.package / directive.DIRECTIVE).exists():
        body["rollback"] = {
            "directive": json.loads((args.package / directive.DIRECTIVE).read_bytes()),
            "signature": (args.package / directive.DIRECTIVE_SIGNATURE).read_text().strip()}
    print(json.dumps(body, sort_keys=True))
    return 0


def _list(args: argparse.Namespace) -> int:
    settings = load(args.config)
    state = ModelStore(settings.ota_dir).read()
    if args.json:
        print(json.dumps(state.to_json(), indent=2, sort_keys=True))
        return 0
    print("\n".join(summary(state.to_json(), settings.model.name or settings.model.path.name,
                             settings.model.version)))
    return 0


def summary(state: dict[str, Any], base_name: str, base_version: str) -> list[str]:
    """`model list`: one line per version (the configured base model, each installed and each
    failed one) with its role and the golden sets' accuracy at each stage when checked."""
    roles: dict[str, list[str]] = {}
    for role in ("active", "previous"):
        if state.get(role) is not None:
            roles.setdefault(str(state[role]), []).append(role)
    trial = state.get("trial")
    if trial:
        roles.setdefault(str(trial["version"]), []).append(f"on trial ({trial['phase']})")

    def golden(figures: Any) -> str:
        parts = []
        for stage, sets in (figures or {}).items():
            for entry in sets if isinstance(sets, list) else []:
                parts.append(f"{stage} {entry.get('route')} {entry.get('accuracy', 0):.3f} "
                             f"({entry.get('right')}/{entry.get('n')}, floor "
                             f"{entry.get('floor', 0):g})")
        return f"; golden {', '.join(parts)}" if parts else ""

    lines = [f"base     {base_name} {base_version} (the configured [model] file)"
             + (f", {', '.join(roles['base'])}" if "base" in roles else "")]
    installed: dict[str, Any] = state.get("installed") or {}
    failed: dict[str, Any] = state.get("failed") or {}
    for version in sorted({*installed, *failed}, key=_version_order):
        entry, failure = installed.get(version) or {}, failed.get(version)
        when = entry.get("installed_at")
        line = (f"{version:<8} "
                + (f"{entry.get('name')} {entry.get('file')} {entry.get('size', 0) / 1e6:.2f} MB"
                   if entry else "not installed")
                + (f", installed {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(when))} UTC"
                   if isinstance(when, (int, float)) else "")
                + (f", {', '.join(roles[version])}" if version in roles else "")
                + (f", FAILED at {failure.get('step')}: {failure.get('reason')}"
                   if failure else "")
                + golden(entry.get("golden") or (
                    {failure.get("step"): (failure.get("figures") or {}).get("golden")}
                    if failure else None)))
        lines.append(line)
    return lines


def _version_order(version: str) -> tuple[int, ...]:
    return modelpkg.version_key(version) if modelpkg.is_version(version) else ()


def _agent_owner(state_dir: Path) -> tuple[int, int] | None:
    """The agent's user and group (the owner of its state directory, the unit's dynamic user
    under systemd) when this command runs as root as someone else, else None: what root writes
    for the agent must be the agent's, or it cannot remove it (issue 14, item 4)."""
    if os.geteuid() != 0:
        return None
    try:
        owner = state_dir.stat()
    except FileNotFoundError:
        return None  # the agent never started; systemd hands the directory over at its start
    if owner.st_uid == 0:
        return None
    return owner.st_uid, owner.st_gid


def _hand_over(path: Path, owner: tuple[int, int] | None) -> None:
    """Give `path` (and what is in it) to the agent's user."""
    if owner is None:
        return
    os.chown(path, *owner)
    if path.is_dir():
        for child in path.iterdir():
            _hand_over(child, owner)


def _install(args: argparse.Namespace) -> int:
    # At idle priority (allowed without privilege, never undone: the process ends): on the
    # gateway's cores the serving worker's llama.cpp threads come first, and the command's
    # work (the configuration, the signature, the copy) waits for the gaps between answers.
    with contextlib.suppress(OSError):  # a seccomp filter may refuse it: then at normal
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    settings = load(args.config)
    package = modelpkg.verify_blocking(args.package, settings.ota.trusted_keys)
    manifest = package.manifest
    owner = _agent_owner(settings.agent.state_dir)
    incoming = settings.incoming_dir
    if not incoming.is_dir():
        incoming.mkdir(parents=True)
        _hand_over(incoming, owner)
    final = incoming / f"{manifest.name}-{manifest.version}"
    hidden = incoming / f".install-{manifest.name}-{manifest.version}-{os.getpid()}"
    shutil.rmtree(hidden, ignore_errors=True)  # our own leftover of an earlier try, if any
    hidden.mkdir()
    names = [*modelpkg.package_files(manifest), modelpkg.MANIFEST, modelpkg.SIGNATURE]
    if directive.read(args.package, settings.ota.trusted_keys) is not None:
        names += [directive.DIRECTIVE, directive.DIRECTIVE_SIGNATURE]
    for name in names:
        durable.copy_file(args.package / name, hidden / name)
    # Handed over before the rename: the agent only ever sees a package it can remove.
    _hand_over(hidden, owner)
    durable.fsync_dir(hidden)
    os.replace(hidden, final)
    durable.fsync_dir(incoming)
    print(f"{final}: handed to the agent; follow its log or `edge-agent model list`")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    settings = load(args.config)
    store = ModelStore(settings.ota_dir)
    owner = _agent_owner(settings.agent.state_dir)
    created = not store.models.is_dir()
    store.ensure()
    if created:
        _hand_over(settings.ota_dir, owner)
    durable.replace(store.rollback_request, b"rollback\n")
    _hand_over(store.rollback_request, owner)
    print(f"{store.rollback_request}: the agent rolls back to {store.read().previous} "
          "(now, or at its next start)")
    return 0


_COMMANDS = {"keygen": _keygen, "sign": _sign, "allow-rollback": _allow_rollback,
             "verify": _verify, "command": _command, "list": _list, "install": _install,
             "rollback": _rollback, "specialize": _specialize}
