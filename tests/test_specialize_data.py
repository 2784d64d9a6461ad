"""`edge-agent model specialize`, the parts before training: labelling rules, the held-out set,
the labels file, the student's vocabulary, and the token ids training uses against the ids
llama.cpp evaluates when the agent's worker answers the same reading."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.config.settings import Route
from agent.inference.worker import Engine
from agent.routing.prompts import build_messages
from agent.specialize import examples, rules, vocab
from agent.specialize.export import write_gguf
from agent.specialize.llamacpp import Tokenizer
from agent.specialize.recipe import Recipe
from tools import make_tiny_model

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "agent.toml"
RULE = "celsius<60:normal,celsius<85:warning,else:critical"


def route(name: str = "temperature") -> Route:
    table = tomllib.loads(CONFIG.read_text())
    return Route(**next(r for r in table["routes"] if r["name"] == name))


def test_a_rule_labels_by_its_first_clause_that_holds() -> None:
    rule = rules.parse_rule(RULE, route())
    assert rule.field == "celsius"
    assert rule.key == "level"
    levels = {x: rule.label({"celsius": x})["level"]
              for x in (-20, 0, 59.99, 60, 60.0, 84.9, 85, 85.01, 200)}
    assert levels == {-20: "normal", 0: "normal", 59.99: "normal", 60: "warning",
                      84.9: "warning", 85: "critical", 85.01: "critical", 200: "critical"}
    booleans = rules.parse_rule("rms>=4.5:true,else:false", route("vibration"))
    assert booleans.label({"rms": 4.5}) == {"wear": True}
    assert booleans.label({"rms": 1}) == {"wear": False}


@pytest.mark.parametrize(("text", "says"), [
    ("celsius<60:normal", "else"),
    ("celsius<60:normal,celsius<85:warning", "last clause must be else"),
    ("celsius~60:normal,else:critical", "'celsius~60:normal' is not FIELD<NUMBER:VALUE"),
    ("celsius<60:cold,else:critical", "level='cold' does not satisfy"),
    ("celsius<60:normal,kelvin<85:warning,else:critical", "the same field"),
])
def test_a_bad_rule_is_refused_naming_the_clause(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="rule") as caught:
        rules.parse_rule(text, route())
    assert says in str(caught.value)


def test_a_reading_without_the_rules_field_is_an_error_naming_it() -> None:
    rule = rules.parse_rule(RULE, route())
    with pytest.raises(ValueError, match="no numeric 'celsius'"):
        rule.label({"temp": 50})


def test_the_held_out_set_covers_the_range_and_the_thresholds_and_is_never_trained_on() -> None:
    rule = rules.parse_rule(RULE, route())
    span = rules.default_range(rule)
    assert span == (-15.0, 160.0)
    train, held = examples.from_rule(route(), rule, span=span, n_train=3000, n_eval=300, seed=0)
    assert len(held) == 300
    assert len(train) == 3000
    held_values = [float(e.reading["celsius"]) for e in held]
    assert not {(e.topic, e.payload) for e in train} & {(e.topic, e.payload) for e in held}
    assert {e.output["level"] for e in held} == {"normal", "warning", "critical"}
    near = [x for x in held_values if min(abs(x - 60), abs(x - 85)) <= 2]
    assert len(near) >= 100  # half are drawn near a threshold
    assert min(held_values) < 0
    assert max(held_values) > 100
    for example in held:
        assert example.topic.startswith("sensors/")
        assert example.topic.endswith("/temperature")
        assert rule.label(example.reading) == example.output
    again, _ = examples.from_rule(route(), rule, span=span, n_train=3000, n_eval=300, seed=0)
    assert again == train  # seeded: the same recipe draws the same readings


def test_a_labels_file_is_read_and_split_and_a_bad_line_names_file_and_line(
        tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    lines = [{"reading": {"celsius": x}, "output": {"level": "normal"}} for x in range(50)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    loaded = examples.load_labels(path, route())
    assert len(loaded) == 50
    assert loaded[0].topic == "sensors/sensor-1/temperature"
    train, held = examples.split(loaded, 200, seed=0)
    assert len(held) == 10
    assert len(train) == 40
    assert not {e.payload for e in train} & {e.payload for e in held}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n"
                   + json.dumps({"reading": {"celsius": 1}, "output": {"level": "hot"}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: output \{'level': 'hot'\}"):
        examples.load_labels(bad, route())
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not JSON"):
        examples.load_labels(bad, route())


def test_the_tiny_model_file_carries_the_base_vocabulary_the_student_extends(
        tmp_path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(make_tiny_model.make_model(tmp_path / "tiny.gguf"))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    template = reader.fields["tokenizer.chat_template"]
    base = vocab.base_vocab()
    assert base.tokens == tokens
    assert bytes(template.parts[template.data[0]]).decode() == vocab.CHAT_TEMPLATE
    extended = vocab.route_vocab(route(), ["celsius", "sensor"])
    assert extended.tokens[:len(tokens)] == tokens
    assert len(set(extended.tokens)) == len(extended.tokens)
    for word in ("\u2581temperature", "\u2581instructions", "SENSOR_DATA", "celsius"):
        assert word in extended.tokens
    pieces = [t for t in extended.tokens if len(t) > 1 and not t.startswith("<0x")]
    assert not [t for t in pieces if any(c.isdigit() for c in t)]  # numbers go digit by digit



def random_model(path: Path, recipe: Recipe, words: vocab.Vocab) -> Path:
    """A one-layer, 64-wide llama GGUF with random weights over `words`: llama.cpp runs it
    through the student's tokenizer and template (its answers are nonsense)."""
    rng = np.random.default_rng(0)
    shapes = [("token_embd.weight", (len(words.tokens), 64)),
              *[(f"blk.0.{n}.weight", (64, 64)) for n in ("attn_q", "attn_k", "attn_v",
                                                            "attn_output", "ffn_gate",
                                                            "ffn_up", "ffn_down")],
              ("output.weight", (len(words.tokens), 64))]
    tensors = [(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
               for name, shape in shapes]
    tensors += [(n, np.ones(64, dtype=np.float32)) for n in ("blk.0.attn_norm.weight",
                                                              "blk.0.ffn_norm.weight",
                                                              "output_norm.weight")]
    return write_gguf(path, recipe, words, tensors, name="r")

def test_training_ids_are_the_ids_llama_cpp_evaluates_for_the_agents_prompt(
        tmp_path: Path) -> None:
    """The tokenizer the trainer uses (a vocabulary-only load) gives, for a reading, exactly
    the ids the worker's Engine evaluates for that reading's prompt; the answer's ids follow
    them unchanged, and detokenize to the JSON the model is taught."""
    from llama_cpp import Llama

    the_route = route()
    recipe = Recipe(n_embd=64, n_layer=1, n_head=4, n_ff=64)
    words = vocab.route_vocab(the_route, ["sensor", "seq", "ts", "celsius"])
    tokenizer = Tokenizer(write_gguf(tmp_path / "vocab.gguf", recipe, words, [], name="v"))
    model = random_model(tmp_path / "random.gguf", recipe, words)
    llm = Llama(model_path=str(model), n_ctx=512, n_threads=1, verbose=False)
    engine = Engine(llm)
    rule = rules.parse_rule(RULE, the_route)
    _, held = examples.from_rule(the_route, rule, span=(-15, 160), n_train=1, n_eval=20, seed=3)
    for example in held:
        messages = build_messages(the_route, example.topic, example.payload)
        ids, n_prompt = tokenizer.example_ids(messages, example.answer)
        assert ids[:n_prompt] == tokenizer.prompt_ids(messages)
        engine.complete({"messages": messages, "max_tokens": 4, "temperature": 0.0})
        assert list(llm.input_ids[:n_prompt]) == ids[:n_prompt], example
        assert ids[-1] == tokenizer.eos_id == 2
        assert tokenizer.detokenize(ids[n_prompt:-1]) == example.answer
        # The reading's digits reach the model one token each.
        digits = [t for t in ids[:n_prompt] if tokenizer.detokenize([t]).strip().isdigit()]
        assert all(len(tokenizer.detokenize([t]).strip()) == 1 for t in digits)
