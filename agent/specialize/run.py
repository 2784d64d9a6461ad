"""`edge-agent model specialize`: labels in, an evaluated student out.

The steps, each printed as it happens: labelled examples (a labels file or a rule) and the
held-out set -> the route's vocabulary and a vocabulary-only GGUF whose llama.cpp tokenizer
tokenizes every training sequence -> training (step, loss, elapsed) -> float32 GGUF export ->
f16, q8_0 and q4_0 by llama.cpp's quantizer -> every file (and an optional base model) answers
the held-out set through llama.cpp -> the table. The output directory gets the GGUF files,
eval.jsonl (the held-out set), recipe.json (how to retrain) and report.json (the table and the
times); with a Packaging, package/: one file signed into a model package with eval.jsonl as the
route's golden set (the OTA canary's floor, docs/ota.md).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from agent.config.settings import Route, Settings, load
from agent.ota import modelpkg
from agent.specialize import examples, llamacpp, rules, student, teacher
from agent.specialize.evaluate import Scores, evaluate, table
from agent.specialize.examples import Sample
from agent.specialize.export import write_gguf
from agent.specialize.recipe import Recipe
from agent.specialize.teacher import Teacher
from agent.specialize.vocab import route_vocab

QUANTS = ("f16", "q8_0", "q4_0")
MAX_READING_KEYS = 64  # keys of the readings given whole-word pieces


@dataclass(frozen=True, slots=True)
class Request:
    config: Path
    route: str
    out: Path
    labels: Path | None = None
    rule: str | None = None
    span: tuple[float, float] | None = None
    recipe: Recipe = field(default_factory=Recipe)
    threads: int = 2  # training's; evaluation uses the worker's, from the configuration
    base: Path | None = None  # a GGUF evaluated beside the student, e.g. the pretrained base
    quants: tuple[str, ...] = QUANTS
    teacher: Teacher | None = None  # labels by a teacher model (agent/specialize/teacher.py)
    package: Packaging | None = None  # a signed package of one file, eval.jsonl its golden set


@dataclass(frozen=True, slots=True)
class Packaging:
    """What `--package-key` asks for: `<out>/package/`, a signed model package
    (agent/ota/modelpkg.py) of the `quant` file with eval.jsonl as the route's golden set, its
    floor `min_accuracy` or, unset, a little under the accuracy measured on eval.jsonl."""

    key: Path
    version: str
    quant: str = "q8_0"
    name: str | None = None  # default: <route>-student
    min_accuracy: float | None = None


FLOOR_MARGIN = 0.02  # the default floor: the measured accuracy less this


@dataclass(frozen=True, slots=True)
class Outcome:
    files: dict[str, Path]
    scores: list[Scores]
    torch_texts: list[str]
    held: list[Sample]
    times_s: dict[str, float]
    package: Path | None = None  # <out>/package/ when asked for


def find_route(config: Path, name: str) -> tuple[Settings, Route]:
    settings = load(config)
    for route in settings.routes:
        if route.name == name:
            return settings, route
    raise ValueError(f"{config}: no route named {name!r}; routes: "
                     f"{', '.join(r.name for r in settings.routes)}")


def labelled(request: Request, route: Route,
             say: Callable[[str], None] = print) -> tuple[list[Sample], list[Sample], Any]:
    """(training, held-out, what the recipe records about the labels)."""
    recipe = request.recipe
    if request.teacher is not None:
        if route.windowed:
            raise ValueError(f"route {route.name} answers windows of readings; the teacher labels "
                             "single readings, so label its windows with --labels FILE "
                             "({\"window\": [...], \"output\": {...}} lines) instead")
        every, source = teacher.labels(request.teacher, route, request.out, span=request.span,
                                       n=recipe.train_examples + recipe.eval_examples,
                                       seed=recipe.seed, say=say)
        train, held = examples.split(every, recipe.eval_examples, recipe.seed)
        return train, held, source
    if request.rule is not None:
        rule = rules.parse_rule(request.rule, route)
        span = request.span or rules.default_range(rule)
        train, held = examples.from_rule(route, rule, span=span, n_train=recipe.train_examples,
                                         n_eval=recipe.eval_examples, seed=recipe.seed)
        return train, held, {"rule": rule.text, "range": list(span)}
    if request.labels is None:
        raise ValueError("give --labels FILE or --rule RULE")
    loaded = examples.load_labels(request.labels, route)
    train, held = examples.split(loaded, recipe.eval_examples, recipe.seed)
    return train, held, {"labels": str(request.labels), "lines": len(loaded)}


def printer(log: TextIO) -> Callable[[str], None]:
    """The progress line writer of specialize and fine_tune: "specialize: ..." to `log`."""
    def say(text: str) -> None:
        print(f"specialize: {text}", file=log, flush=True)
    return say


def write_report(path: Path, scores: list[Scores], agreements: list[float],
                 held: list[Sample], times: dict[str, float], **extra: Any) -> None:
    """report.json: each file's scores with its agreement with the torch model, the times and
    the first 50 misses of the first file."""
    path.write_text(json.dumps(
        {"scores": [s.to_json() | {"agrees_with_torch": a}
                    for s, a in zip(scores, agreements, strict=True)],
         **extra, "times_s": times,
         "misses": [{**e.source, "expected": e.output, "got": text}
                    for e, text, hit in zip(held, scores[0].texts, scores[0].hits, strict=True)
                    if not hit][:50]}, indent=2) + "\n")


def specialize(request: Request, log: TextIO | None = None) -> Outcome:
    """Run every step for `request`, printing progress and the table to `log` (default: the
    sys.stdout of the moment, not of import time)."""
    log = log or sys.stdout
    say = printer(log)
    started = time.monotonic()
    times: dict[str, float] = {}
    settings, route = find_route(request.config, request.route)
    recipe = request.recipe
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    train, held, source = labelled(request, route, say)
    say(f"route {route.name}: {len(train)} training and {len(held)} held-out examples")
    keys = sorted({k for e in train for k in e.reading_keys})[:MAX_READING_KEYS]
    vocab = route_vocab(route, keys)
    tokenizer = llamacpp.Tokenizer(write_gguf(out / "vocab.gguf", recipe, vocab, [],
                                              name=f"{route.name}-vocab"))
    data = [student.Tokens(*tokenizer.example_ids(e.messages(route), e.answer)) for e in train]
    longest = max(len(d.ids) for d in data)
    if longest > recipe.n_ctx:
        recipe = replace(recipe, n_ctx=longest)
    times["data_s"] = time.monotonic() - started
    say(f"vocabulary {len(vocab.tokens)} tokens; sequences up to {longest} tokens; training "
        f"{recipe.n_layer} layers x {recipe.n_embd} for {recipe.steps} steps of {recipe.batch}")

    mark, cpu = time.monotonic(), time.process_time()
    student.set_threads(request.threads)
    model = student.train(recipe, len(vocab.tokens), data, lambda p: say(
        f"step {p.step}/{p.steps} loss {p.loss:.4f} elapsed {p.elapsed_s:.1f} s "
        f"(cpu {p.cpu_s:.1f} s)"))
    times["train_s"] = time.monotonic() - mark
    times["train_cpu_s"] = time.process_time() - cpu

    mark = time.monotonic()
    name = f"{route.name}-student"
    files = {"f32": write_gguf(out / f"{name}-f32.gguf", recipe, vocab, model.tensors(),
                               name=name)}
    for kind in request.quants:
        files[kind] = llamacpp.quantize(files["f32"], out / f"{name}-{kind}.gguf", kind)
    times["export_s"] = time.monotonic() - mark

    mark = time.monotonic()
    torch_texts = [tokenizer.detokenize(student.greedy(
        model, tokenizer.prompt_ids(e.messages(route)),
        eos_id=tokenizer.eos_id, max_new=route.max_tokens)) for e in held]
    times["torch_greedy_s"] = time.monotonic() - mark
    scores: list[Scores] = []
    candidates = list(files.items())
    if request.base is not None:
        candidates.append(("base", request.base))
    for label, path in candidates:
        n_ctx = max(recipe.n_ctx, 512) if label != "base" else 2048
        scores.append(evaluate(label, path, route, held, n_ctx=n_ctx,
                               n_threads=settings.model.n_threads,
                               n_threads_batch=settings.model.threads_batch, note=say))
        say(f"{label}: accuracy {scores[-1].accuracy:.3f}")
    times["eval_s"] = time.monotonic() - mark
    times["total_s"] = time.monotonic() - started

    examples.write_jsonl(out / "eval.jsonl", held)
    (out / "recipe.json").write_text(json.dumps(
        {"route": route.name, "recipe": recipe.to_json(), "labels": source,
         "vocab_tokens": len(vocab.tokens), "reading_keys": keys}, indent=2) + "\n")
    write_report(out / "report.json", scores, [s.agreement(torch_texts) for s in scores], held,
                 times)
    (out / "vocab.gguf").unlink()
    print(table(scores, torch_texts), file=log)
    say(f"data {times['data_s']:.0f} s, training {times['train_s']:.0f} s "
        f"(cpu {times['train_cpu_s']:.0f} s), export "
        f"{times['export_s']:.0f} s, evaluation {times['eval_s']:.0f} s, total "
        f"{times['total_s']:.0f} s; written to {out}")
    package = None
    if request.package is not None:
        package = make_package(request.package, route.name, files, scores, out,
                               n_ctx=max(recipe.n_ctx, 512))
        say(f"package {package}: signed, with eval.jsonl as the golden set of route "
            f"{route.name}")
    return Outcome(files, scores, torch_texts, held, times, package)


def make_package(spec: Packaging, route: str, files: dict[str, Path], scores: list[Scores],
                 out: Path, *, n_ctx: int) -> Path:
    """Write `out`/package/ for `spec`: the file of `spec.quant` and `out`/eval.jsonl as the
    golden set of `route`, whose floor is `spec.min_accuracy` or the accuracy `scores` measured
    for that file on eval.jsonl less FLOOR_MARGIN. A ValueError with the figure when the
    measured accuracy is under an explicit floor (nothing is written then)."""
    if spec.quant not in files:
        raise ValueError(f"cannot package {spec.quant}: the files are {', '.join(files)}")
    measured = next(s.accuracy for s in scores if s.label == spec.quant)
    if spec.min_accuracy is not None and measured < spec.min_accuracy:
        raise ValueError(f"not packaged: {spec.quant} scored accuracy {measured:.3f} on "
                         f"{out / 'eval.jsonl'}, under the floor {spec.min_accuracy:g} "
                         "(--min-accuracy)")
    floor = spec.min_accuracy if spec.min_accuracy is not None else \
        max(0.0, round(measured - FLOOR_MARGIN, 3))
    target = out / "package"
    modelpkg.build(files[spec.quant], target, name=spec.name or f"{route}-student",
                   version=spec.version, n_ctx=n_ctx, canary=[], key=spec.key,
                   golden=[(route, out / "eval.jsonl", floor)])
    return target
