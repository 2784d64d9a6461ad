"""Co-inference on real parts: llama-cpp-python's OpenAI-compatible server as the cloud model on
a loopback port, the real inference worker as the local model, and a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.base.records import Generation, Reading
from agent.base.waits import wait_or_timeout
from agent.config.settings import ConfigError, Settings, load
from agent.flows.executors import Executors
from agent.flows.offload import CircuitBreaker
from agent.flows.pipeline import Pipeline
from agent.inference.cloud import CloudError, CloudModel, CloudUnavailable
from agent.inference.supervisor import InferenceWorker, identify
from agent.routing.outbound import Topics
from agent.service.metrics import Metrics
from agent.store.writer import Store
from tests.harness import LlamaServer

SCHEMA = {"type": "object", "required": ["level"], "additionalProperties": False,
          "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}
MESSAGES = [{"role": "user", "content": "Classify: {\"celsius\": 80}"}]


@pytest.fixture
def server(tmp_path: Path, tiny_model: Path) -> Iterator[LlamaServer]:
    cloud = LlamaServer(tiny_model, tmp_path)
    try:
        yield cloud.start()
    finally:
        if cloud.proc is not None and cloud.running:
            os.kill(cloud.proc.pid, signal.SIGCONT)
        cloud.kill()


def route(name: str, executor: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "topics": [f"s/{name}/#"], "instruction": "Classify.",
            "max_tokens": 24, "output_schema": SCHEMA, "executor": executor, **extra}


def settings(tmp_path: Path, model: Path, server: LlamaServer, *routes: dict[str, Any],
             **cloud: Any) -> Settings:
    return Settings(
        agent={"device_id": "gw", "state_dir": tmp_path / "state"},
        model={"path": model, "n_ctx": 256, "n_threads": 1},
        pipeline={"max_attempts": 2, "retry_backoff_s": 0},
        cloud_model={"base_url": server.base_url, "model": server.alias,
                     "api_key": server.api_key, "timeout_s": 5, "response_format": "json_object",
                     "failure_threshold": 2, "cooldown_s": 0.5, **cloud},
        routes=list(routes),
    )


class Rig:
    """The pipeline as app.py wires it: worker, cloud client, breaker, inbox depth."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Rig:
        cfg = self.cfg
        self.store = await Store.open(cfg.store_path)
        self.worker = InferenceWorker(cfg.model, await identify(cfg.model, "tiny-local"))
        await self.worker.start()
        self.cloud = CloudModel(cfg.cloud_model)

        async def depth() -> int:
            return (await self.store.depths())["inbox"]

        breaker = CircuitBreaker(cfg.cloud_model.failure_threshold, cfg.cloud_model.cooldown_s)
        self.executors = Executors(self.cloud, breaker, depth)
        self.pipeline = Pipeline(cfg, self.store, self.worker, Topics("edge", "gw"),
                                 executors=self.executors)
        self.task = asyncio.create_task(self.pipeline.run(self.stop), name="pipeline")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        self.store.inbox_changed.set()
        await asyncio.wait_for(self.task, 30)
        await self.cloud.aclose()
        await self.worker.close()
        await self.store.close()

    async def feed(self, route_name: str, first: int, count: int) -> list[str]:
        readings = [Reading(f"{route_name}-{i:04d}", f"s/{route_name}/1",
                            json.dumps({"seq": i, "celsius": 20 + i % 70}).encode(), float(i),
                            route_name, 0) for i in range(first, first + count)]
        await self.store.ingest(readings, [])
        return [r.id for r in readings]

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if self.task.done():
                self.task.result()
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def results(self) -> list[dict[str, Any]]:
        return [json.loads(row.payload) for row in await self.store.pending_outbox(10_000)]


def test_cloud_model_answers_under_the_schema_and_failures_are_named(
    tmp_path: Path, tiny_model: Path, server: LlamaServer
) -> None:
    """The real server answers under the route's schema with its model's name; a wrong key is
    `cloud error HTTP 401`, a stopped (SIGSTOP) server `cloud timeout`, a dead one
    `cloud unreachable`; the key never appears in an error."""
    cfg = settings(tmp_path, tiny_model, server, route("c", "cloud"), timeout_s=1.5)

    async def scenario() -> None:
        cloud = CloudModel(cfg.cloud_model)
        wrong = CloudModel(cfg.cloud_model.model_copy(
            update={"api_key": cfg.cloud_model.api_key.__class__("not-the-key")}))
        try:
            answer = await cloud.complete(MESSAGES, Generation(24, 0.0, 0, SCHEMA))
            assert json.loads(answer.completion.text)["level"] in SCHEMA["properties"][  # type: ignore[index]
                "level"]["enum"]
            assert answer.model.name == "cloud-tiny"
            assert answer.completion.completion_tokens > 0
            with pytest.raises(CloudError) as refused:
                await wrong.complete(MESSAGES, Generation(4, 0.0, 0, None))
            assert refused.value.reason == "cloud error HTTP 401"
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            with pytest.raises(CloudError) as slow:
                await cloud.complete(MESSAGES, Generation(4, 0.0, 0, None))
            assert slow.value.reason == "cloud timeout"
            os.kill(server.proc.pid, signal.SIGCONT)
            server.kill()
            with pytest.raises(CloudError) as gone:
                await cloud.complete(MESSAGES, Generation(4, 0.0, 0, None))
            assert gone.value.reason == "cloud unreachable"
            for error in (refused.value, slow.value, gone.value):
                assert server.api_key not in str(error)
        finally:
            await cloud.aclose()
            await wrong.aclose()

    asyncio.run(scenario())


def test_cloud_killed_mid_run_falls_back_to_local_and_the_breaker_closes_after_restart(
    tmp_path: Path, tiny_model: Path, server: LlamaServer
) -> None:
    """A cloud-first route: results come from the cloud; the server is SIGKILLed while readings
    are in flight, and every remaining reading is answered locally, saying why; none is lost or
    dead-lettered. The server restarts on the same port; after the cool-down one probe closes
    the breaker and results come from the cloud again."""
    cfg = settings(tmp_path, tiny_model, server, route("cf", "cloud-first"))

    async def scenario() -> list[dict[str, Any]]:
        async with Rig(cfg) as rig:
            ids = await rig.feed("cf", 0, 40)
            await rig.until(lambda: rig.pipeline.completed >= 5)
            await asyncio.to_thread(server.kill)
            await rig.until(lambda: rig.pipeline.completed >= 40)
            assert rig.executors.breaker.state != "closed"
            await asyncio.to_thread(server.start)
            await asyncio.sleep(cfg.cloud_model.cooldown_s)
            ids += await rig.feed("cf", 40, 20)
            await rig.until(lambda: rig.pipeline.completed >= 60)
            assert rig.executors.breaker.state == "closed"
            depths = await rig.store.depths()
            assert (depths["inbox"], depths["dead_letter"]) == (0, 0)
            results = await rig.results()
            assert sorted(r["id"] for r in results) == sorted(ids)
            return results

    results = sorted(asyncio.run(scenario()), key=lambda r: r["id"])
    assert all(r["status"] == "ok" for r in results)
    before, during, after = results[:5], results[5:40], results[40:]
    for result in before:
        assert (result["executor"], result["model"]["name"]) == ("cloud", "cloud-tiny")
        assert "executor_reason" not in result
    fell_back = [r for r in during if r["executor"] == "local"]
    assert fell_back, "no reading fell back to local after the kill"
    assert during[-1]["executor"] == "local"
    reasons = Counter(r["executor_reason"] for r in fell_back)
    assert set(reasons) <= {"fallback: cloud unreachable", "fallback: cloud circuit open"}
    assert reasons["fallback: cloud circuit open"] > 0
    for result in fell_back:
        assert result["model"]["name"] == "tiny-local"
        assert result["model"]["sha256"]
    assert after[-1]["executor"] == "cloud"
    assert Counter(r["executor"] for r in after)["cloud"] >= len(after) - 1
    print(f"\nafter the kill: {len(fell_back)} local ({dict(reasons)}); after the restart: "
          f"{Counter(r['executor'] for r in after)}")


def test_a_local_route_sends_nothing_to_a_cloud_that_is_up(
    tmp_path: Path, tiny_model: Path, server: LlamaServer
) -> None:
    """Thirty readings of a `local` route, with a healthy cloud and a deep backlog: the server's
    access log counts zero requests. One reading of a cloud-first route then shows up as one
    request, so the count is live."""
    cfg = settings(tmp_path, tiny_model, server, route("loc", "local"),
                   route("cf", "cloud-first"))

    async def scenario() -> list[dict[str, Any]]:
        async with Rig(cfg) as rig:
            await rig.feed("loc", 0, 30)
            await rig.until(lambda: rig.pipeline.completed >= 30)
            assert server.requests() == 0
            assert rig.cloud.requests == 0
            await rig.feed("cf", 0, 1)
            await rig.until(lambda: rig.pipeline.completed >= 31)
            await asyncio.to_thread(_wait_for, lambda: server.requests() == 1)
            return await rig.results()

    results = asyncio.run(scenario())
    local = [r for r in results if r["route"] == "loc"]
    assert len(local) == 30
    assert all(r["executor"] == "local" and "executor_reason" not in r for r in local)
    assert [r["executor"] for r in results if r["route"] == "cf"] == ["cloud"]


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    from tests.harness import wait_until

    wait_until(predicate, timeout_s, "the server's access log")


def test_local_first_offloads_a_deep_backlog_and_stays_local_when_the_cloud_is_down(
    tmp_path: Path, tiny_model: Path, server: LlamaServer
) -> None:
    """80 readings queued on a local-first route with a 50 ms budget: while the estimated wait
    (inbox depth x mean local latency) is over budget, readings go to the cloud with reason
    `offload: local backlog`; the rest runs locally. With the server killed, a
    second backlog runs entirely locally, with no reason (local is the preferred executor)."""
    cfg = settings(tmp_path, tiny_model, server, route("lf", "local-first",
                                                      latency_budget_ms=50))

    mean_ms: list[float] = []

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with Rig(cfg) as rig:
            await rig.feed("lf", 0, 80)
            await rig.until(lambda: rig.pipeline.completed >= 80)
            first = await rig.results()
            mean_ms.append(rig.executors.latency.mean_ms)
            await asyncio.to_thread(server.kill)
            await rig.feed("lf", 80, 80)
            await rig.until(lambda: rig.pipeline.completed >= 160)
            assert rig.executors.breaker.opened >= 1  # the backlog did make it try the cloud
            second = [r for r in await rig.results() if int(r["id"][-4:]) >= 80]
            return first, second

    first, second = asyncio.run(scenario())
    assert len(first) == 80
    assert all(r["status"] == "ok" for r in first)
    share = Counter(r["executor"] for r in first)
    assert share["cloud"] > 0, share
    assert share["local"] > 0, share
    offloaded = [r for r in first if r["executor"] == "cloud"]
    assert all(r["executor_reason"] == "offload: local backlog" for r in offloaded)
    assert all(r["model"]["name"] == "cloud-tiny" for r in offloaded)
    # The first reading runs locally whatever the backlog: no local latency is known yet.
    assert sorted(first, key=lambda r: r["id"])[0]["executor"] == "local"
    assert len(second) == 80
    assert all(r["executor"] == "local" and "executor_reason" not in r for r in second)
    print(f"\nlocal-first, 80-reading backlog, 50 ms budget, mean local latency "
          f"{mean_ms[0]:.1f} ms: cloud {share['cloud']} ({share['cloud'] / 80:.0%}), "
          f"local {share['local']} ({share['local'] / 80:.0%}); cloud down: local 80 of 80")


def test_a_cloud_route_holds_its_readings_through_an_outage_while_local_routes_flow(
    tmp_path: Path, tiny_model: Path, server: LlamaServer
) -> None:
    """The cloud server is killed: readings of a `cloud` route wait in the inbox with no
    attempt counted, far past max_attempts x cool-down, none dead-lettered, while a `local`
    route beside it keeps being answered. The server comes back: every cloud reading is
    answered by the cloud."""
    cfg = settings(tmp_path, tiny_model, server, route("c", "cloud"), route("l", "local"))

    async def scenario() -> tuple[dict[str, int], list[dict[str, Any]]]:
        async with Rig(cfg) as rig:
            metrics = rig.pipeline.observer = Metrics()
            waiting = {"route": "c"}
            await asyncio.to_thread(server.kill)
            cloud_ids = await rig.feed("c", 0, 5)
            local_ids = await rig.feed("l", 100, 5)
            await rig.until(lambda: rig.pipeline.completed >= 5)
            # Many cool-downs (0.5 s) and tries: before, each cost an attempt (max 2).
            await rig.until(lambda: rig.executors.breaker.opened >= 4)
            held = await rig.store.depths()
            assert set(rig.pipeline.waiting_routes) == {"c"}
            assert metrics.registry.get_sample_value("edge_agent_route_waiting", waiting) == 1
            await asyncio.to_thread(server.start)
            await rig.until(lambda: rig.pipeline.completed >= 10)
            assert rig.pipeline.waiting_routes == {}
            assert metrics.registry.get_sample_value("edge_agent_route_waiting", waiting) == 0
            results = await rig.results()
            assert sorted(r["id"] for r in results) == sorted(cloud_ids + local_ids)
            return held, results

    held, results = asyncio.run(scenario())
    assert (held["inbox"], held["dead_letter"]) == (5, 0)
    by_route = {r["route"]: r["executor"] for r in results}
    assert by_route == {"c": "cloud", "l": "local"}
    assert all(r["attempts"] == 1 for r in results if r["route"] == "c"), [
        r["attempts"] for r in results]


class TricklingServer:
    """An HTTP endpoint that sends its headers, then one byte of body every `gap_s`: each read
    is quick, the whole answer never comes (a proxy or server that stalls mid-answer)."""

    def __init__(self, gap_s: float = 0.3, total_s: float = 30.0) -> None:
        self.gap_s = gap_s
        self.total_s = total_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> TricklingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._stop.set()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            loop = asyncio.get_running_loop()
            end = loop.time() + self.total_s
            while loop.time() < end and not self._stop.is_set():
                writer.write(b" ")
                await writer.drain()
                await wait_or_timeout(self._stop, self.gap_s)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def test_a_cloud_that_trickles_its_answer_times_out_after_timeout_s_in_all(
    tmp_path: Path
) -> None:
    """A byte every 0.3 s keeps every read under httpx's per-read timeout; the request still
    ends as `cloud timeout` once timeout_s (1 s) has passed since it started, not when the
    server stops trickling (30 s)."""

    async def scenario() -> tuple[CloudError, float]:
        async with TricklingServer() as trickle:
            section = Settings(
                agent={"device_id": "gw", "state_dir": tmp_path},
                model={"path": tmp_path / "m.gguf"},
                cloud_model={"base_url": f"http://127.0.0.1:{trickle.port}/v1",
                             "timeout_s": 1.0},
                routes=[route("c", "cloud")],
            ).cloud_model
            cloud = CloudModel(section)
            started = asyncio.get_running_loop().time()
            try:
                with pytest.raises(CloudError) as timed_out:
                    await cloud.complete(MESSAGES, Generation(4, 0.0, 0, None))
            finally:
                await cloud.aclose()
            return timed_out.value, asyncio.get_running_loop().time() - started

    error, elapsed = asyncio.run(scenario())
    assert error.reason == "cloud timeout"
    assert isinstance(error, CloudUnavailable)
    assert "within 1 s" in str(error)
    assert elapsed < 10.0, f"the request took {elapsed:.1f} s"


GOOD = """
[agent]
device_id = "gw-1"
[model]
path = "model.gguf"
[[routes]]
name = "t"
topics = ["sensors/#"]
instruction = "Classify."
"""


def test_a_non_local_route_without_a_cloud_model_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + 'executor = "cloud-first"\n')
    with pytest.raises(ConfigError, match=r"routes\[0\]\.executor is 'cloud-first' but "
                                          r"cloud_model\.base_url is not set"):
        load(path)
    path.write_text(GOOD + 'executor = "local-first"\n[cloud_model]\nbase_url = "http://x/v1"\n')
    with pytest.raises(ConfigError, match=r"routes\[0\].*latency_budget_ms is required"):
        load(path)


def test_the_api_key_comes_from_a_credential_file_and_never_shows(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("sk-very-secret\n")
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + 'executor = "cloud"\n[cloud_model]\nbase_url = "http://x/v1"\n'
                    'api_key_file = "key"\n')
    cfg = load(path)
    assert cfg.cloud_model.api_key is not None
    assert cfg.cloud_model.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(cfg)
    (tmp_path / "key").unlink()
    with pytest.raises(ConfigError, match=r"cloud_model\.api_key_file: cannot read"):
        load(path)
