"""The demo's models: students of its temperature route, trained by `edge-agent model
specialize`'s Python API (agent/specialize/run.py) from a threshold rule, and cached outside the
clone so that only a machine's first demo trains.

Two students of one recipe and seed, so they are scored on the same held-out readings: a quick
one (few steps; the demo's version 1) and a better one (the demo's version 2, the one shipped
over the air with its held-out set as the golden set). Each lives in
${XDG_CACHE_HOME:-~/.cache}/edge-agent/demo-models/<key>/, the specializer's output directory
(GGUF files, eval.jsonl, recipe.json, report.json) plus demo-model.json; the key is a digest of
everything that makes the model: the recipe, the rule, the quantization, the route's prompt and
schema as the agent renders them, and the code of agent/specialize/ (not its comments). A change
to any of them trains anew; anything else reuses the cache. A student is trained into a
temporary directory and renamed into place whole, under a lock, so two demos (or the demo and
its test) starting together train once and an interrupted run leaves nothing half-made.

Training needs the [train] extra (PyTorch); a cached model does not.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agent.base.digest import sha256_file
from agent.config.settings import Route, load
from agent.routing.prompts import build_messages
from agent.specialize.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent
ROUTE = "temperature"
RULE = "celsius<60:normal,celsius<85:warning,else:critical"
QUANT = "q8_0"  # the file the demo serves; the specializer also scores the float32 export
# One recipe and seed (hence one held-out set) for both; only the number of steps differs.
SEED = 1
QUICK = Recipe(steps=400, seed=SEED)
BETTER = Recipe(steps=1500, seed=SEED)
# The code whose change changes the model: the specializer (the prompt it trains on is in the
# key as the agent renders it). Its syntax trees, not its bytes: see code_digest.
CODE = tuple(sorted((REPO / "agent" / "specialize").glob("*.py")))
RECORD = "demo-model.json"


class TrainExtraMissing(RuntimeError):
    """A student must be trained and PyTorch (the [train] extra) is not importable."""


@dataclass(frozen=True, slots=True)
class Student:
    """A trained, evaluated student in the cache."""

    directory: Path
    gguf: Path  # the QUANT file
    eval_set: Path  # eval.jsonl: the held-out readings, never trained on
    accuracy: float  # the QUANT file's, on eval_set, through llama.cpp
    n_eval: int
    steps: int
    train_s: float | None  # None: taken from the cache

    @property
    def cached(self) -> bool:
        return self.train_s is None


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-agent" / "demo-models"


def route_of(config: Path, name: str = ROUTE) -> Route:
    for route in load(config).routes:
        if route.name == name:
            return route
    raise ValueError(f"{config}: no route named {name!r}")


def key(route: Route, recipe: Recipe, rule: str = RULE) -> str:
    """The cache key of a student: a digest of all that makes it."""
    made_of = {
        "recipe": recipe.to_json(), "rule": rule, "quant": QUANT,
        "route": {"name": route.name, "topics": list(route.topics),
                  "prompt": build_messages(route, "sensors/x/temperature", "{}"),
                  "schema": route.output_schema, "max_tokens": route.max_tokens},
        "code": code_digest(CODE),
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:24]


def code_digest(paths: Iterable[Path]) -> str:
    """A digest of the code in `paths`, blind to comments, docstrings and layout: their syntax
    trees without docstrings, so that rewording a comment does not retrain every machine's
    demo models."""
    digest = hashlib.sha256()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                           | ast.AsyncFunctionDef) and node.body
                    and isinstance(node.body[0], ast.Expr)
                    and isinstance(node.body[0].value, ast.Constant)
                    and isinstance(node.body[0].value.value, str)):
                node.body = node.body[1:] or [ast.Pass()]
        digest.update(f"{path.name}\0{ast.dump(tree)}\0".encode())
    return digest.hexdigest()


@contextmanager
def locked(root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the cache's lock: a second demo waits here while the first trains."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another demo holds {root / '.lock'} (it is training the models); waiting "
                "for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_cached(directory: Path) -> Student | None:
    """The student cached in `directory`, or None if it is not there whole."""
    try:
        record = json.loads((directory / RECORD).read_text())
        gguf = directory / record["file"]
        if sha256_file(gguf) != record["sha256"]:
            return None
        return Student(directory, gguf, directory / "eval.jsonl", float(record["accuracy"]),
                       int(record["n_eval"]), int(record["steps"]), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def require_torch(where: Path) -> None:
    try:
        importlib.import_module("torch")
    except ImportError as exc:
        raise TrainExtraMissing(
            f"the demo trains its models once per machine (into {where}) with PyTorch, the "
            f"project's [train] extra, which {sys.executable} cannot import ({exc}); install "
            f"it with: {sys.executable} -m pip install -e '{REPO}[train]' (tools/bootstrap.sh "
            f"installs .[dev,train])") from exc


def train(config: Path, recipe: Recipe, target: Path, log: TextIO) -> Student:
    """Run the specializer into a temporary directory beside `target`, then rename it."""
    require_torch(target)
    from agent.specialize.run import Request, specialize  # imports torch

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    outcome = specialize(Request(config=config, route=ROUTE, out=partial, rule=RULE,
                                 recipe=recipe, quants=(QUANT,)), log=log)
    took = time.monotonic() - started
    scores = next(s for s in outcome.scores if s.label == QUANT)
    gguf = outcome.files[QUANT]
    (partial / RECORD).write_text(json.dumps({
        "file": gguf.name, "sha256": sha256_file(gguf), "accuracy": scores.accuracy,
        "n_eval": len(outcome.held), "steps": recipe.steps, "rule": RULE, "route": ROUTE,
        "total_s": round(took, 1)}, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return Student(target, target / gguf.name, target / "eval.jsonl", scores.accuracy,
                   len(outcome.held), recipe.steps, took)


def students(config: Path, recipes: list[Recipe], *, root: Path | None = None,
             say: Callable[[str], None] = print, log: TextIO | None = None) -> list[Student]:
    """One student per recipe for the route of `config`, from the cache or trained into it.
    Training's progress (one line every 25 steps) goes to `log` (default: sys.stdout)."""
    root = root or cache_root()
    route = route_of(config)
    found: list[Student] = []
    with locked(root, say):
        for partial in root.glob("*.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        for recipe in recipes:
            directory = root / key(route, recipe)
            student = load_cached(directory)
            if student is None:
                say(f"training a student of route {route.name} for {recipe.steps} steps "
                    f"(once per machine; cached in {directory})")
                student = train(config, recipe, directory, log or sys.stdout)
                say(f"trained in {student.train_s:.0f} s")
            found.append(student)
    return found

