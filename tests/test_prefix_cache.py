"""The prefix cache in the real worker: a route's fixed prompt is evaluated once and restored."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.base.records import Completion, Generation
from agent.config.settings import ModelSection, Route
from agent.flows.executors import prefix_key
from agent.inference.supervisor import InferenceWorker, identify
from agent.routing.prompts import build_messages

SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
          "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}


def route(name: str) -> Route:
    instruction = f"Route {name}: classify the level of the reading. " + "the level is " * 40
    return Route(name=name, topics=["s/#"], instruction=instruction, output_schema=SCHEMA)


async def interleaved(model: Path, cached: bool) -> list[Completion]:
    """Eight readings alternating between two routes, at temperature 0."""
    section = ModelSection(path=model, n_ctx=512, n_threads=1)
    worker = InferenceWorker(section, await identify(section, "tiny"))
    await worker.start()
    try:
        out = []
        for i in range(8):
            r = route("ab"[i % 2])
            messages = build_messages(r, "s/1", json.dumps({"seq": i, "celsius": 20 + i}))
            out.append(await worker.complete(
                messages, Generation(24, 0.0, 0, SCHEMA, prefix_key(r) if cached else None)))
        return out
    finally:
        await worker.close()


def test_interleaved_routes_reuse_their_prefix_and_answer_as_without_the_cache(
    tiny_model: Path,
) -> None:
    """Without prefix keys, alternating routes share only the system prompt with the previous
    request; with them, from the third request on each finds its route's whole
    instruction already evaluated. The answers are the same either way."""
    plain = asyncio.run(interleaved(tiny_model, cached=False))
    cached = asyncio.run(interleaved(tiny_model, cached=True))
    assert [c.text for c in cached] == [c.text for c in plain]
    assert all(c.prompt_tokens > 150 for c in plain)
    # Without keys only the system prompt, common to both routes, is found evaluated.
    assert all(c.reused_tokens < 0.25 * c.prompt_tokens for c in plain)
    for completion in cached[2:]:
        assert completion.reused_tokens > 0.85 * completion.prompt_tokens, completion
