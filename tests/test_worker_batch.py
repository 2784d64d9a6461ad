"""Batched decoding in the real worker (issue 16): several readings decoded together in one
llama.cpp context answer exactly as each does alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.config.settings import Route
from agent.routing.prompts import build_messages

SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
          "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}


def route(name: str) -> Route:
    return Route(name=name, topics=["s/#"], output_schema=SCHEMA,
                 instruction=f"Route {name}: classify the level of the reading. " * 3)


def request(i: int, temperature: float = 0.0, schema: bool = True,
            max_tokens: int = 24) -> dict[str, Any]:
    r = route("ab"[i % 2])
    messages = build_messages(r, f"s/{i % 3}", json.dumps({"seq": i, "celsius": 20 + 7 * i}))
    return {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "seed": 100 + i, "schema": SCHEMA if schema else None, "prefix_key": r.name}


class Worker:
    """`python -m agent.inference.worker` spoken to over its pipes, as the supervisor does."""

    def __init__(self, model: Path, max_batch: int, n_ctx: int = 1024,
                 keep_s: float = 0.25) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.inference.worker", "--model", str(model),
             "--n-ctx", str(n_ctx), "--n-threads", "1", "--max-batch", str(max_batch),
             "--keep-sequences-s", str(keep_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.read()["event"] == "ready"
        self.ids = 0

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the worker exited"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def send(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.ids += 1
        self.proc.stdin.write(json.dumps({**message, "id": self.ids}) + "\n")
        self.proc.stdin.flush()
        reply = self.read()
        assert reply["id"] == self.ids
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def answered_alone(model: Path, requests: list[dict[str, Any]], n_ctx: int = 1024
                   ) -> list[dict[str, Any]]:
    """Each request's answer from a worker that never batches, one at a time."""
    alone = Worker(model, max_batch=1, n_ctx=n_ctx)
    try:
        return [alone.send(r) for r in requests]
    finally:
        alone.close()


def answers(replies: list[dict[str, Any]]) -> list[tuple[str, str, int, int]]:
    return [(r["text"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"])
            for r in replies]


def test_a_batch_answers_every_reading_token_for_token_as_one_at_a_time(
    tiny_model: Path,
) -> None:
    """Twelve readings of two routes, greedy and sampled (each with its own seed), under the
    schema's grammar and without one, and one cut at max_tokens: decoded together in batches
    they get the text, finish reason and token counts each gets alone from a worker that never
    batches."""
    requests = [request(i) for i in range(8)] + [
        request(8, temperature=0.8), request(9, temperature=0.8),
        request(10, schema=False), request(11, max_tokens=3)]
    expected = answered_alone(tiny_model, requests)
    batched = Worker(tiny_model, max_batch=4)
    try:
        reply = batched.send({"batch": requests})
        # Sent one at a time, the batching worker answers as before too.
        single = [batched.send(r) for r in requests[:4]]
    finally:
        batched.close()
    got = reply["batch"]
    assert all(r["ok"] for r in expected + got), got
    assert answers(got) == answers(expected)
    assert answers(single) == answers(expected[:4])
    # They really were decoded together, both routes in one batch, as many as fit at once.
    assert all("batch_error" not in r for r in got)
    assert all("batch_size" in r for r in got)
    assert max(r["batch_size"] for r in got) == 4
    assert len({r["text"] for r in got}) > 2  # not one answer for all


def test_a_lone_request_just_after_a_batch_starts_from_its_kept_sequences_until_idle(
    tiny_model: Path,
) -> None:
    """The pipeline's next round of a backlog finds the worker idle for a moment: its first
    request is decoded from the sequences the batch kept (it evaluates little more than its
    payload) instead of dropping them. Once the worker has been idle for --keep-sequences-s
    they are dropped, and a lone request has the context to itself. The same answers all
    along."""
    lone = [request(i) for i in (6, 7, 12)]
    expected = answered_alone(tiny_model, lone)
    kept = Worker(tiny_model, max_batch=4, keep_s=600.0)
    try:
        kept.send({"batch": [request(i) for i in range(4)]})
        warm = [kept.send(r) for r in lone]
    finally:
        kept.close()
    dropped = Worker(tiny_model, max_batch=4, keep_s=0.05)
    try:
        dropped.send({"batch": [request(i) for i in range(4)]})
        time.sleep(1.0)  # 20 times the idle bound
        cold = dropped.send(lone[0])
    finally:
        dropped.close()
    assert answers(warm) == answers(expected)
    assert answers([cold]) == answers(expected[:1])
    assert all(r.get("batch_size") == 1 for r in warm), warm
    # Its route and topic's reading in the batch left all but the payload's tokens (272 of
    # 313 seen); dropped, only what sequence 0 shares with it (72 seen).
    assert warm[0]["prompt_tokens"] - warm[0]["reused_tokens"] < 0.2 * warm[0]["prompt_tokens"]
    assert cold["reused_tokens"] < warm[0]["reused_tokens"], (warm, cold)
    assert "batch_size" not in cold, cold


def test_a_batch_reuses_its_routes_prefix_and_leaves_it_for_the_next_request(
    tiny_model: Path,
) -> None:
    """In a first batch only the first reading evaluates the route's prompt, the others copy
    it; a second batch of the route, after one of another route, finds it in the sequences
    kept from the first, and a single request of that route after it finds it in sequence 0."""
    worker = Worker(tiny_model, max_batch=4)
    try:
        first = worker.send({"batch": [request(i) for i in (0, 2)]})["batch"]
        worker.send({"batch": [request(i) for i in (1, 3)]})  # the other route between
        second = worker.send({"batch": [request(i) for i in (8, 10)]})["batch"]
        after = worker.send(request(16))
    finally:
        worker.close()
    assert first[0]["reused_tokens"] == 0
    # The route's prompt up to the reading's topic, most of each prompt.
    for r in [*first[1:], *second, after]:
        assert r["reused_tokens"] > 0.6 * r["prompt_tokens"], r


def test_readings_of_one_topic_share_their_prompt_within_a_batch_and_across_batches(
    tiny_model: Path,
) -> None:
    """Readings of one route and topic differ only from their payload on: in a first batch
    the first evaluates its prompt and the others copy all of it up to the payload; in the
    next batch each finds that much in a kept sequence. Both answer as alone."""
    first = [request(i) for i in (0, 6, 12)]  # i % 6 == 0: route a, topic s/0
    second = [request(i) for i in (18, 24, 30)]
    expected = answered_alone(tiny_model, first + second)
    batched = Worker(tiny_model, max_batch=4)
    try:
        got = (batched.send({"batch": first})["batch"]
               + batched.send({"batch": second})["batch"])
    finally:
        batched.close()
    assert answers(got) == answers(expected)
    assert [r["batch_size"] for r in got] == [3] * 6
    assert got[0]["reused_tokens"] == 0
    for r in got[1:]:
        assert r["reused_tokens"] > 0.85 * r["prompt_tokens"], r


def test_a_reading_whose_kept_sequence_was_evicted_answers_as_alone(tiny_model: Path) -> None:
    """With a cache too small to keep every sequence, a batch evicts the kept sequence it does
    not use (the least recently used); a later reading of that sequence's topic starts from
    the route's prompt instead, evaluates more, and answers as alone."""
    parts = [[0, 1, 2], [7, 8], [6, 12]]  # 7 and 8 match 1 and 2; 6 and 12 match 0
    expected = answered_alone(tiny_model, [request(i) for part in parts for i in part], n_ctx=768)

    def run(n_ctx: int) -> list[dict[str, Any]]:
        worker = Worker(tiny_model, max_batch=3, n_ctx=n_ctx)
        try:
            return [r for part in parts
                    for r in worker.send({"batch": [request(i) for i in part]})["batch"]]
        finally:
            worker.close()

    tight, roomy = run(768), run(2048)
    assert answers(tight) == answers(expected) == answers(roomy)
    assert [r["batch_size"] for r in tight] == [3, 3, 3, 2, 2, 2, 2]
    # Reading 6 finds its topic's prompt (reading 0's) kept in the roomy cache only.
    assert tight[5]["reused_tokens"] < roomy[5]["reused_tokens"]
    assert roomy[5]["reused_tokens"] > 0.85 * roomy[5]["prompt_tokens"]


def test_a_batch_larger_than_the_context_holds_is_answered_in_parts(tiny_model: Path) -> None:
    """With a context too small for all of them at once, the readings are decoded a few at a
    time and still answer as alone."""
    requests = [request(2 * i) for i in range(6)]  # one route
    expected = answered_alone(tiny_model, requests, n_ctx=512)
    small = Worker(tiny_model, max_batch=6, n_ctx=512)
    try:
        got = small.send({"batch": requests})["batch"]
    finally:
        small.close()
    assert answers(got) == answers(expected)
    sizes = [r.get("batch_size", 1) for r in got]
    assert 1 < max(sizes) < 6, sizes


def test_requests_waiting_for_the_worker_go_as_one_batch_and_a_lone_one_alone(
    tiny_model: Path,
) -> None:
    """Eight concurrent callers: the first finds the worker idle and goes alone, the seven
    that waited meanwhile go together; every caller gets the answer a non-batching worker
    gives. A request at an idle worker afterwards goes alone."""
    import asyncio

    from agent.base.records import Completion, Generation
    from agent.config.settings import ModelSection
    from agent.inference.supervisor import MAX_BATCH, InferenceWorker, identify

    requests = [request(2 * i) for i in range(8)]

    async def run(max_batch: int) -> tuple[list[Completion], int, int]:
        section = ModelSection(path=tiny_model, n_ctx=1024, n_threads=1)
        worker = InferenceWorker(section, await identify(section, "tiny"), max_batch=max_batch)
        await worker.start()
        try:
            out = await asyncio.gather(*(worker.complete(r["messages"], Generation(
                r["max_tokens"], r["temperature"], r["seed"], r["schema"], r["prefix_key"]))
                for r in requests))
            together = worker.batched_requests
            await worker.complete(requests[0]["messages"], Generation(24, 0.0, 0, SCHEMA))
            return list(out), together, worker.batched_requests
        finally:
            await worker.close()

    alone, none, _ = asyncio.run(run(1))
    batched, together, after = asyncio.run(run(MAX_BATCH))
    assert none == 0
    assert together == 7
    assert after == together
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in batched] == [
        (c.text, c.finish_reason, c.completion_tokens) for c in alone]
