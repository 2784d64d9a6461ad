"""A fix to the GBNF grammars llama-cpp-python builds from a JSON schema, so that every string the
grammar admits is one strict `json.loads` accepts. Pure text processing; agent/inference/worker.py
applies it (that module owns llama_cpp).

llama-cpp-python 0.3's json_schema_to_gbnf writes the string-character rule as
`char ::= [^"\\] | "\\" (...)`, which admits the raw control characters U+0000..U+001F inside a
string. RFC 8259 section 7 requires them escaped and Python's json.loads (strict=True) rejects
them, so a sampled answer with a raw newline or tab in a free string field would not parse.
Every negated character class in the schema's grammar belongs to a string (the char rule, and
`.` or `[^...]` in a `pattern`), so excluding U+0000..U+001F from each negated class closes the
hole at the grammar; escapes (\\n, \\u0001) stay admitted.
"""

from __future__ import annotations

CONTROL_CHARS = r"\x00-\x1F"


def forbid_raw_control_chars(gbnf: str) -> str:
    """The same grammar with U+0000..U+001F excluded from every negated character class.

    Quoted literals and comments are copied untouched, so a `[^` inside an enum value or a
    const is not mistaken for a class.
    """
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        ch = gbnf[i]
        if ch == '"':  # a literal: copy through the closing quote, honouring escapes
            end = i + 1
            while end < n and gbnf[end] != '"':
                end += 2 if gbnf[end] == "\\" else 1
            out.append(gbnf[i:end + 1])
            i = end + 1
        elif ch == "#":  # a comment runs to the end of the line
            end = gbnf.find("\n", i)
            end = n if end < 0 else end
            out.append(gbnf[i:end])
            i = end
        elif ch == "[":  # a character class: copy through the closing bracket
            end = i + 1
            while end < n and gbnf[end] != "]":
                end += 2 if gbnf[end] == "\\" else 1
            body = gbnf[i + 1:end]
            if body.startswith("^"):
                body = "^" + CONTROL_CHARS + body[1:]
            out.append("[" + body + "]")
            i = end + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)
