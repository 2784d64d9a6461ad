"""The student's vocabulary and chat template: a SentencePiece-style ("llama") vocabulary with
byte fallback, extended with the words of one route's prompt.

The base part is also the vocabulary of the test models (tools/make_tiny_model.py writes
them with base_vocab() and export.write_gguf), so the student tokenizes like them. The route's
fixed text (system prompt, instruction, the data block's frame, the output schema's keys and
values, the readings' keys) is appended as whole-word pieces, so that the ~500 characters of the
prompt come to ~150 tokens instead of ~450: that is what makes training from scratch fit in
minutes on 2 cores.
Digits get no pieces: a number reaches the model one digit per token, which is what lets a small
model read it. Pure data; no gguf, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.base.records import Reading
from agent.config.settings import Route
from agent.routing.prompts import build_messages
from agent.routing.windows import build_window_messages

SPACE = "\u2581"  # SentencePiece's "▁", stands for a space inside tokens
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# gguf.TokenType values (llama.cpp's llama_token_type), spelled out to keep gguf out of here.
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_BYTE = 1, 2, 3, 6

# "_" stands for SPACE.
BASE_PIECE_TEXT = (
    '_the _a _is _of _to in er on {" ": ", "} _" _{ _} _[ ], '
    "level normal warning critical <| |> system user assistant"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A word with the space before it, or a run of the same punctuation ("<<<").
_WORD = re.compile(r" ?[A-Za-z][A-Za-z_-]*|([<>{}\[\]])\1+")
MAX_PIECE_CHARS = 24


@dataclass(frozen=True, slots=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def base_vocab() -> Vocab:
    """make_tiny_model's vocabulary, in its order."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TYPE_UNKNOWN, TYPE_CONTROL, TYPE_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TYPE_BYTE] * 256
    chars = [SPACE if c == 0x20 else chr(c) for c in range(0x20, 0x7F)]
    pieces = tuple(p.replace("_", SPACE) for p in BASE_PIECE_TEXT.split())
    multi = _with_prefixes(pieces)
    tokens += chars + list(multi)
    types += [TYPE_NORMAL] * (len(chars) + len(multi))
    # Higher score merges first: longer pieces win; single characters never merge "into".
    scores = [0.0] * (3 + 256) + [-1000.0] * len(chars) + [float(len(p)) for p in multi]
    return Vocab(tokens, scores, types)


def route_vocab(route: Route, reading_keys: Iterable[str] = ()) -> Vocab:
    """The base vocabulary plus whole-word pieces of the route's fixed prompt text, its output
    schema's strings and the readings' keys, appended after the base (whose ids stay put)."""
    base = base_vocab()
    known = set(base.tokens)
    # JSON keys and values as bare words: the base pieces `{"`, ` "` and `":` take the quotes,
    # so `{"celsius": 72.3}` comes out as {" celsius ": ▁ 7 2 . 3 }, the key one token. The
    # same for a topic's levels, which follow a "/".
    text = [_frame_text(route), *_schema_strings(route.output_schema), *reading_keys]
    text += [level for topic in route.topics for level in topic.split("/")]
    words: list[str] = []
    for chunk in text:
        words += [m.group(0).replace(" ", SPACE) for m in _WORD.finditer(chunk)]
    extra = [p for p in _with_prefixes(words) if p not in known and len(p) <= MAX_PIECE_CHARS]
    return Vocab(base.tokens + extra, base.scores + [float(len(p)) for p in extra],
                 base.types + [TYPE_NORMAL] * len(extra))


def _with_prefixes(pieces: Iterable[str]) -> dict[str, None]:
    """Each piece with every prefix of two or more characters, first seen first: llama.cpp's
    SPM tokenizer only merges adjacent symbols whose concatenation is in the vocabulary."""
    multi: dict[str, None] = {}
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            multi.setdefault(piece[:end], None)
    return multi


def _frame_text(route: Route) -> str:
    """Everything the route's prompt says around a reading (around a window's readings, with
    a window line's keys, for a windowed route), rendered through the template."""
    if route.windowed:
        messages = build_window_messages(route, [Reading("r", "sensors/a/b", b"{}", 0.0,
                                                         route.name, 0)])
    else:
        messages = build_messages(route, "sensors/a/b", "{}")
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _schema_strings(schema: Any) -> list[str]:
    """Property names and string values of a schema."""
    found: list[str] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                found += list(value)
            found += _schema_strings(value)
    elif isinstance(schema, list):
        for item in schema:
            found += _schema_strings(item)
    elif isinstance(schema, str):
        found.append(schema)
    return found
