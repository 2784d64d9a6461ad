"""`edge-agent model specialize` for a route that answers windows of readings: window rules,
synthetic windows and their held-out set, the window prompt the student is trained on against
the one the pipeline sends, and (with the [train] extra) a small run whose GGUF files judge
held-out windows by a rule that needs every reading of the window."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from agent.base.records import Reading
from agent.config.settings import Route, load
from agent.inference.worker import Engine
from agent.routing.windows import build_window_messages
from agent.specialize import examples, rules, vocab
from agent.specialize.export import write_gguf
from agent.specialize.llamacpp import Tokenizer
from agent.specialize.recipe import Recipe
from tests.test_specialize_data import random_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "agent.toml"
RULE = "mean(rms)>7.1 or rise(rms)>3:true,else:false"


def route(name: str = "wear") -> Route:
    return next(r for r in load(CONFIG).routes if r.name == name)


def rms(*values: float) -> list[dict[str, float]]:
    return [{"rms": x} for x in values]


def test_a_window_rule_judges_the_whole_window_in_order() -> None:
    rule = rules.parse_rule(RULE, route())
    assert isinstance(rule, rules.WindowRule)
    assert (rule.field, rule.key) == ("rms", "wear")
    wear = {values: rule.label(rms(*values))["wear"] for values in [
        (7.0, 7.1, 7.2),        # mean exactly 7.1 (as written, not as floats): not above
        (7.0, 7.1, 7.21),       # mean 7.103...
        (1.0, 4.0),             # rises by exactly 3: not more
        (1.0, 4.01),            # rises by 3.01 at a mean of 2.5
        (4.01, 1.0),            # falls
        (9.0,),                 # one reading: its value is the mean, no rise
        (2.0, 9.0, 9.0, 2.0),   # peaks but neither rises overall nor averages above 7.1
    ]}
    assert wear == {(7.0, 7.1, 7.2): False, (7.0, 7.1, 7.21): True, (1.0, 4.0): False,
                    (1.0, 4.01): True, (4.01, 1.0): False, (9.0,): True,
                    (2.0, 9.0, 9.0, 2.0): False}
    both = rules.parse_rule("max(rms)>=9 and first(rms)<3:true,min(rms)<0.5:false,"
                            "last(rms)>8:true,else:false", route())
    assert both.label(rms(2, 9))["wear"] is True          # the and-clause
    assert both.label(rms(4, 9, 7.5))["wear"] is False    # first is not below 3, last not > 8
    assert both.label(rms(4, 9.5, 8.5))["wear"] is True   # the third clause
    assert both.label(rms(3.5, 0.4, 8.5))["wear"] is False  # the second clause comes first
    with pytest.raises(ValueError, match="no numeric 'rms'"):
        rule.label([{"rms": 1}, {"velocity": 2}])


@pytest.mark.parametrize(("text", "says"), [
    ("mean(rms)>7.1:true", "else"),
    ("avg(rms)>7.1:true,else:false", "'avg' is not one of mean, min, max, first, last, rise"),
    ("mean(rms)>7.1 or rms>3:true,else:false",
     "'mean(rms)>7.1 or rms>3:true': 'rms>3' is not AGG(FIELD)<NUMBER"),
    ("mean(rms)>7.1 or rise(rms)>3 and max(rms)>9:true,else:false", "mixes and with or"),
    ("mean(rms)>7.1 or rise(g)>3:true,else:false", "the same field"),
    ("mean(rms)>7.1:worn,else:false", "wear='worn' does not satisfy"),
    ("mean(rms)>7.1:true,rise(rms)>3:true", "last clause must be else"),
    ("rms>7.1:true,else:false", "'rms>7.1' is not AGG(FIELD)<NUMBER"),
])
def test_a_bad_window_rule_is_refused_naming_the_clause(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="rule") as caught:
        rules.parse_rule(text, route())
    assert says in str(caught.value)


def test_a_window_rule_needs_a_windowed_route() -> None:
    with pytest.raises(ValueError, match="route 'vibration' answers one reading at a time"):
        rules.parse_rule(RULE, route("vibration"))


def test_held_out_windows_are_the_routes_windows_near_both_boundaries_and_never_trained_on(
        ) -> None:
    the_route = route()
    rule = rules.parse_rule(RULE, the_route)
    assert rules.default_range(rule) == pytest.approx((1.1, 13.1))
    train, held = examples.from_rule(the_route, rule, span=rules.default_range(rule),
                                     n_train=2000, n_eval=300, seed=0)
    assert len(train) == 2000
    assert len(held) == 300
    assert not {e.key for e in train} & {e.key for e in held}
    assert all(isinstance(e, examples.WindowExample) for e in held)
    sizes = Counter(len(e.readings) for e in held)  # type: ignore[union-attr]
    assert set(sizes) == {1, 2, 3, 4}  # window_max_readings = 4, shorter when the wait ran out
    assert sizes[4] > 150
    means, rises, causes = [], [], Counter()
    for example in held:
        assert isinstance(example, examples.WindowExample)
        readings = [reading for _, reading in example.readings]
        assert len({topic for topic, _ in example.readings}) == 1  # one sensor's series
        assert example.output == rule.label(readings)
        values = [rules.exact(r["rms"]) for r in readings]
        means.append(float(rules.aggregate("mean", values)))
        rises.append(float(rules.aggregate("rise", values)))
        causes[(means[-1] > 7.1, rises[-1] > 3)] += 1
    # Each way to wear and the way not to are there, and many windows sit near a boundary.
    assert min(causes.values()) >= 20, causes
    assert 0.4 < sum(e.output["wear"] for e in held) / 300 < 0.75
    assert sum(abs(m - 7.1) <= 0.6 for m in means) >= 60
    assert sum(abs(r - 3) <= 0.6 for r in rises) >= 40
    again, _ = examples.from_rule(the_route, rule, span=rules.default_range(rule),
                                  n_train=2000, n_eval=300, seed=0)
    assert again == train


def test_a_window_labels_file_is_read_and_a_single_reading_line_is_refused(
        tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    lines = [{"window": [{"topic": "sensors/p-1/bearing", "reading": {"rms": x}},
                         {"reading": {"rms": x + 1}}], "output": {"wear": x > 7}}
             for x in range(10)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = examples.load_labels(path, route())
    assert [e.to_json() for e in loaded][3] == {
        "window": [{"topic": "sensors/p-1/bearing", "reading": {"rms": 3}},
                   {"topic": "sensors/sensor-1/bearing", "reading": {"rms": 4}}],
        "output": {"wear": False}}
    examples.write_jsonl(tmp_path / "eval.jsonl", loaded)
    assert examples.read_jsonl(tmp_path / "eval.jsonl") == loaded
    path.write_text(json.dumps(lines[0]) + "\n"
                    + json.dumps({"reading": {"rms": 1}, "output": {"wear": False}}) + "\n")
    with pytest.raises(ValueError, match=r"labels\.jsonl:2: route 'wear' answers windows"):
        examples.load_labels(path, route())


def test_training_ids_are_the_ids_llama_cpp_evaluates_for_the_pipelines_window_prompt(
        tmp_path: Path) -> None:
    """A held-out window's training ids are exactly what the worker's Engine evaluates for the
    prompt the pipeline builds from the leased readings (build_window_messages on the payload
    bytes as a sensor sent them, compact or pretty-printed), and the answer follows them."""
    from llama_cpp import Llama

    the_route = route()
    recipe = Recipe(n_embd=64, n_layer=1, n_head=4, n_ff=64)
    rule = rules.parse_rule(RULE, the_route)
    train, held = examples.from_rule(the_route, rule, span=(1.1, 13.1), n_train=200,
                                     n_eval=12, seed=3)
    words = vocab.route_vocab(the_route, sorted({k for e in train for k in e.reading_keys}))
    for word in ("\u2581holds", "index", "topic", "reading", "bearing", "rms"):
        assert word in words.tokens
    tokenizer = Tokenizer(write_gguf(tmp_path / "vocab.gguf", recipe, words, [], name="v"))
    model = random_model(tmp_path / "random.gguf", recipe, words)
    llm = Llama(model_path=str(model), n_ctx=1024, n_threads=1, verbose=False)
    engine = Engine(llm)
    for number, example in enumerate(held):
        assert isinstance(example, examples.WindowExample)
        leased = [Reading(f"id-{number}-{i}", topic,
                          json.dumps(reading, indent=2 if i % 2 else None,
                                     separators=None if i % 2 else (",", ":")).encode(),
                          1_765_000_000.0 + i, "wear", 1)
                  for i, (topic, reading) in enumerate(example.readings)]
        sent = build_window_messages(the_route, leased)
        assert example.messages(the_route) == sent
        ids, n_prompt = tokenizer.example_ids(example.messages(the_route), example.answer)
        engine.complete({"messages": sent, "max_tokens": 4, "temperature": 0.0})
        assert list(llm.input_ids[:n_prompt]) == ids[:n_prompt], example
        assert tokenizer.detokenize(ids[n_prompt:-1]) == example.answer
        assert ids[-1] == tokenizer.eos_id


# -- a small training run (the [train] extra) --------------------------------------------------

# Sustained vibration above 7.1 mm/s (every reading of the window) or a spike above 11: the rule
# measured in docs/specialize.md ("Measurements of the wear route"). One training thread: on the
# loaded shared machine two spent far more CPU for the same steps. 69 s of training CPU; 23 min
# end to end at load average 12, 8 min at load average 4 to 7.
TRAINED_RULE = "min(rms)>7.1 or max(rms)>11:true,else:false"
SMALL = Recipe(n_embd=64, n_layer=2, n_head=4, n_ff=128, steps=1000, batch=16, lr=4e-3,
               warmup_steps=20, train_examples=6000, eval_examples=200, seed=0)
# Seeds 0 and 1 reached 0.815 and 0.795 (every file; the commoner label is 0.61 and 0.66 of
# the held-out windows): the floor leaves 0.045 below the worst.
SMALL_FLOOR = 0.75


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 23 min at load average 12 (69 s of training CPU)
def test_a_small_run_from_a_window_rule_ships_gguf_files_that_judge_held_out_windows(
        tmp_path: Path) -> None:
    """Trained from the window rule on the wear route's window prompts: every GGUF answers the
    held-out windows under the route's grammar, the float32 file exactly as the torch student,
    and well above always answering the commoner label."""
    pytest.importorskip("torch")
    from agent.specialize.run import Request, specialize

    out = tmp_path / "student"
    log = tmp_path / "specialize.log"
    with log.open("w") as stream:
        outcome = specialize(Request(config=CONFIG, route="wear", out=out, rule=TRAINED_RULE,
                                     recipe=SMALL, threads=1), stream)
    text = log.read_text()
    scores = {s.label: s for s in outcome.scores}
    assert list(scores) == ["f32", "f16", "q8_0", "q4_0"]
    assert list(scores["f32"].texts) == outcome.torch_texts
    assert scores["f16"].agreement(outcome.torch_texts) >= 0.98
    assert scores["q8_0"].agreement(outcome.torch_texts) >= 0.97
    for s in scores.values():
        assert s.schema_valid == 1.0, s.label
    held = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(held) == SMALL.eval_examples == len(outcome.held)
    assert all(len(row["window"]) >= 1 and "reading" not in row for row in held)
    commoner = max(Counter(row["output"]["wear"] for row in held).values()) / len(held)
    assert commoner < 0.7
    assert scores["f32"].accuracy >= SMALL_FLOOR, text
    assert scores["f32"].accuracy >= commoner + 0.1, text
    assert json.loads((out / "recipe.json").read_text())["labels"]["rule"] == TRAINED_RULE
    report = json.loads((out / "report.json").read_text())
    assert all("window" in miss for miss in report["misses"])
