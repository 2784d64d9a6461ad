"""The OTA flow in-process on real parts: real llama.cpp workers on generated models, a real
SQLite store, the real pipeline taking readings while a model is judged and swapped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.base.records import Generation, ModelInfo, Reading, reading_id
from agent.cli.models import summary
from agent.config.settings import Settings
from agent.flows.pipeline import Pipeline
from agent.inference import priority
from agent.inference.supervisor import InferenceWorker, PriorityNotRestored
from agent.inference.switch import WorkerSwitch
from agent.ota import directive, modelpkg
from agent.ota.startup import decide_startup
from agent.ota.state import ModelStore
from agent.ota.updates import Ota
from agent.routing.outbound import Topics
from agent.routing.prompts import build_messages, prefix_key
from agent.store.writer import Store
from tests.harness import TEST_ROUTES
from tests.otakit import SLOW, keypair, package, write_golden, wrong_shapes_package

ROUTE = {"name": "temperature", "topics": ["sensors/+/temperature"],
         "instruction": "Classify the temperature reading as normal, warning or critical.",
         "max_tokens": 24,
         "output_schema": {"type": "object", "required": ["level"],
                           "additionalProperties": False,
                           "properties": {"level": {"enum": ["normal", "warning", "critical"]}}}}
assert "temperature" in TEST_ROUTES


def make_settings(tmp_path: Path, model: Path, public: str, version: str = "1",
                  **ota: Any) -> Settings:
    return Settings(
        agent={"device_id": "gw", "state_dir": tmp_path / "state"},
        model={"path": model, "n_ctx": 512, "n_threads": 1, "name": "base", "version": version},
        pipeline={"max_attempts": 2, "retry_backoff_s": 0},
        routes=[ROUTE],
        ota={"trusted_keys": [public], **ota},
    )


@dataclass
class Running:
    settings: Settings
    store: Store
    switch: WorkerSwitch
    ota: Ota
    models: ModelStore

    async def feed(self, start: int, n: int) -> None:
        batch = []
        for i in range(start, start + n):
            topic = f"sensors/s{i % 3}/temperature"
            payload = json.dumps({"seq": i, "celsius": 20 + i % 70}).encode()
            batch.append(Reading(reading_id("gw", topic, payload), topic, payload, time.time(),
                                 "temperature", 0))
        await self.store.ingest(batch, [])

    def outbox(self, kind: str) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.settings.store_path)
        try:
            rows = conn.execute("SELECT payload, created_at FROM outbox WHERE kind = ? "
                                "ORDER BY seq", (kind,)).fetchall()
        finally:
            conn.close()
        return [{**json.loads(payload), "_created_at": created} for payload, created in rows]

    def events(self, step: str) -> list[dict[str, Any]]:
        return [e for e in self.outbox("model_event") if e["step"] == step]

    async def drained(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while (await self.store.depths())["inbox"]:
            assert time.monotonic() < deadline, "the pipeline did not drain the inbox"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    store = await Store.open(settings.store_path)
    models = ModelStore(settings.ota_dir)
    start = await decide_startup(settings, models)
    worker = InferenceWorker(start.section, start.info)
    await worker.start()
    switch = WorkerSwitch(worker)
    topics = Topics("edge", "gw")
    ota = Ota(settings, store, switch, topics, models)
    pipeline = Pipeline(settings, store, switch, topics)
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(pipeline.run(stop), name="pipeline")
            try:
                yield Running(settings, store, switch, ota, models)
            finally:
                stop.set()
    finally:
        await switch.serving.worker.close()
        await store.close()


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ota-kit")
    key, public = keypair(work)
    return {"work": work, "key": key, "public": public}


def fresh(kit: dict[str, Any], tmp_path: Path, version: str, **model: int) -> Path:
    """A package copied into this test's incoming/ (the flow deletes what it consumed)."""
    src = package(kit["work"], kit["key"], version, seed=int(version.split(".")[0]), **model)
    dst = tmp_path / "state" / "incoming" / f"pkg-{version}"
    dst.mkdir(parents=True)
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


async def test_a_model_too_slow_for_the_canary_budget_is_never_promoted(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """A valid, hash-checked but slow model misses a 50 ms canary budget: it never serves, it
    is marked failed with the figures, and the base model keeps answering."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], canary_latency_budget_ms=50)
    pkg = fresh(kit, tmp_path, "2", **SLOW)
    async with running(settings) as rig:
        assert not await rig.ota.install(pkg, asyncio.Event())
        refused = rig.events("refused")
        assert refused[0]["stage"] == "canary"
        assert "over the 50.0 ms budget" in refused[0]["reason"]
        assert refused[0]["figures"]["answers"][0]["latency_ms"] > 50
        assert rig.switch.info.version == "1"
        state = rig.models.read()
        assert state.active == "base"
        assert state.trial is None
        assert "2" in state.failed
        await rig.feed(0, 3)
        await rig.drained()
        assert {r["model"]["version"] for r in rig.outbox("result")} == {"1"}


async def test_a_model_with_wrong_shapes_fails_to_load_and_is_never_promoted(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """A signed GGUF whose n_embd metadata contradicts its tensors is refused by llama.cpp in
    the candidate worker; the serving worker is untouched."""
    settings = make_settings(tmp_path, tiny_model, kit["public"])
    src = wrong_shapes_package(kit["work"], kit["key"], "7")
    pkg = tmp_path / "state" / "incoming" / "broken"
    pkg.mkdir(parents=True)
    for item in src.iterdir():
        (pkg / item.name).write_bytes(item.read_bytes())
    async with running(settings) as rig:
        pid = rig.switch.serving.worker.pid
        assert not await rig.ota.install(pkg, asyncio.Event())
        refused = rig.events("refused")
        assert refused[0]["stage"] == "load"
        assert "llama.cpp refused" in refused[0]["reason"]
        assert rig.switch.serving.worker.pid == pid
        await rig.feed(0, 2)
        await rig.drained()
        assert [r["status"] for r in rig.outbox("result")] == ["ok", "ok"]


async def test_an_older_or_equal_version_is_refused_by_anti_rollback(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """With base version 3 a validly signed version 2 (and 3.0) is refused before staging."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], version="3")
    async with running(settings) as rig:
        for version in ("2", "3.0"):
            assert not await rig.ota.install(fresh(kit, tmp_path, version), asyncio.Event())
        reasons = [e["reason"] for e in rig.events("rejected")]
        assert len(reasons) == 2
        assert all("not newer than installed 3 (anti-rollback)" in r for r in reasons)
        assert not list(rig.models.models.iterdir()), "a refused version was staged"


async def test_a_model_that_degrades_in_probation_is_rolled_back_automatically(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """A slower model passes a generous canary, then its probation p95 exceeds 1.5 times
    the previous model's: the old worker (still running) serves again, the version is failed
    with the figures, and every reading still has an ok result naming the model that made it."""
    # 1.5: the slow model is several times slower, but 2 shared cores make latency noisy.
    settings = make_settings(tmp_path, tiny_model, kit["public"], probation_requests=12,
                             probation_latency_factor=1.5)
    pkg = fresh(kit, tmp_path, "2", **SLOW)
    async with running(settings) as rig:
        await rig.feed(0, 60)  # the previous model's p95 from a warm, steady window
        await rig.drained()
        old_pid = rig.switch.serving.worker.pid
        install = asyncio.create_task(rig.ota.install(pkg, asyncio.Event()))
        sent = 60
        while not install.done():
            await rig.feed(sent, 2)
            sent += 2
            await asyncio.sleep(0.1)
        assert install.result() is False, json.dumps(rig.events("committed")[0]["figures"])
        await rig.drained()
        rolled = rig.events("rolled_back")[0]
        assert rolled["stage"] == "probation"
        assert "p95 latency" in rolled["reason"]
        figures = rolled["figures"]
        assert figures["candidate"]["p95_ms"] > figures["p95_limit_ms"]
        assert rig.switch.serving.worker.pid == old_pid
        state = rig.models.read()
        assert state.active == "base"
        assert state.trial is None
        assert state.failed["2"]["figures"]["candidate"]["requests"] >= 12
        results = rig.outbox("result")
        assert len({r["id"] for r in results}) == sent
        assert all(r["status"] == "ok" for r in results)
        versions = [r["model"]["version"] for r in results]
        assert "2" in versions
        assert versions[-1] == "1"
        back = next(r["_created_at"] for r in results
                    if r["_created_at"] > rolled["verdict_at"] and r["model"]["version"] == "1")
        print(f"failed verdict -> traffic switched back {rolled['switched_back_ms']} ms, "
              f"first result of the old model {(back - rolled['verdict_at']) * 1000:.0f} ms")
        assert rolled["switched_back_ms"] < 1000


async def test_a_successful_swap_under_a_stream_fails_nothing_and_names_each_model(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """Readings keep arriving while version 2 is loaded, canaried, switched in and committed:
    every reading gets an ok result, results switch from version 1 to 2 exactly once, and
    the pause in the result stream at the switch is measured."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], probation_requests=10,
                             probation_latency_factor=20.0)
    pkg = fresh(kit, tmp_path, "2")
    async with running(settings) as rig:
        await rig.feed(0, 10)
        await rig.drained()
        install = asyncio.create_task(rig.ota.install(pkg, asyncio.Event()))
        sent = 10
        while not install.done():
            await rig.feed(sent, 1)
            sent += 1
            await asyncio.sleep(0.02)
        assert install.result() is True, rig.events("rolled_back")
        await rig.drained()
        results = rig.outbox("result")
        assert len({r["id"] for r in results}) == sent
        assert all(r["status"] == "ok" for r in results)
        versions = [r["model"]["version"] for r in results]
        first_new = versions.index("2")
        assert set(versions[:first_new]) == {"1"}
        assert set(versions[first_new:]) == {"2"}
        gaps = [b["_created_at"] - a["_created_at"] for a, b in itertools.pairwise(results)]
        switch_gap = gaps[first_new - 1]
        typical = statistics.median(gaps)
        print(f"swap pause: gap at switch {switch_gap * 1000:.1f} ms, "
              f"median gap {typical * 1000:.1f} ms, max gap {max(gaps) * 1000:.1f} ms")
        state = rig.models.read()
        assert (state.active, state.previous, state.trial) == ("2", "base", None)
        assert [e["step"] for e in rig.outbox("model_event")][-1] == "committed"
        # The candidate loaded and canaried under SCHED_IDLE (where this process may come back
        # from it) and serves under SCHED_OTHER, every thread of it.
        [loaded] = rig.events("loaded")
        yields = priority.round_trip_refusal() is None
        assert loaded["scheduling"] == ("idle" if yields else "normal")
        serving = rig.switch.serving.worker
        assert serving.pid == loaded["pid"]
        assert set(priority.thread_policies(serving.pid).values()) == {priority.SCHED_OTHER}


async def test_a_candidate_that_cannot_leave_idle_priority_is_refused(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A candidate that passed its canary but could not return to normal priority never serves
    (it would get only CPU time nothing else wants): refused at stage `priority` with the
    reason, its worker stopped, the base model serving."""
    async def stuck(self: InferenceWorker) -> None:
        raise PriorityNotRestored("returning to SCHED_OTHER failed: threads [7] did not take "
                                  "scheduling policy 0")

    monkeypatch.setattr(InferenceWorker, "end_yield", stuck)
    settings = make_settings(tmp_path, tiny_model, kit["public"])
    pkg = fresh(kit, tmp_path, "2")
    async with running(settings) as rig:
        assert not await rig.ota.install(pkg, asyncio.Event())
        [refused] = rig.events("refused")
        assert refused["stage"] == "priority"
        assert "did not return to normal CPU priority" in refused["reason"]
        assert "threads [7]" in refused["reason"]
        [loaded] = rig.events("loaded")
        assert loaded["pid"] not in {rig.switch.serving.worker.pid}
        assert rig.switch.info.version == "1"
        assert "2" in rig.models.read().failed


async def test_a_package_for_a_newer_agent_is_refused_before_staging(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """min_agent_version above this agent's version: rejected with both versions named,
    nothing staged, the base model still serving."""
    settings = make_settings(tmp_path, tiny_model, kit["public"])
    src = package(kit["work"] / "newer-agent", kit["key"], "2", seed=2,
                  min_agent_version="999.1")
    pkg = tmp_path / "state" / "incoming" / "needs-999"
    shutil.copytree(src, pkg)
    async with running(settings) as rig:
        assert not await rig.ota.install(pkg, asyncio.Event())
        reason = rig.events("rejected")[0]["reason"]
        assert f"needs agent 999.1; this is {__version__}" in reason
        assert not list(rig.models.models.iterdir())
        assert rig.models.read().trial is None
        assert rig.switch.info.version == "1"


def with_directive(kit: dict[str, Any], pkg: Path, devices: list[str],
                   same_as: Path | None = None) -> Path:
    """Add a rollback directive to `pkg`: a new one, or the very one beside `same_as`."""
    if same_as is not None:
        for name in (directive.DIRECTIVE, directive.DIRECTIVE_SIGNATURE):
            shutil.copy(same_as / name, pkg / name)
        return pkg
    manifest, _ = modelpkg.read_signed(pkg, [kit["public"]])
    body, signature = directive.make(manifest, devices=devices, valid_for_s=600,
                                     reason="back to the last good model", key=kit["key"])
    directive.write(pkg, body, signature)
    return pkg


async def test_a_signed_rollback_directive_lets_an_older_version_back_once(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """2 then 3 are committed. Version 2 again is refused by anti-rollback; with a directive
    for this device it goes through the whole pipeline and serves; a directive for another
    device is refused; after 4, the same directive replayed for 2 is refused as used. A
    version failed by an operator rollback comes back only with a directive of its own."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], probation_max_s=0.3,
                             probation_requests=1000)
    stop = asyncio.Event()
    async with running(settings) as rig:
        for version in ("2", "3"):
            assert await rig.ota.install(fresh(kit, tmp_path, version), stop), version
        assert not await rig.ota.install(fresh(kit, tmp_path, "2"), stop)
        assert "not newer than installed 3 (anti-rollback)" in rig.events("rejected")[-1]["reason"]

        elsewhere = with_directive(kit, fresh(kit, tmp_path, "2"), ["gw-elsewhere"])
        assert not await rig.ota.install(elsewhere, stop)
        assert "not for device 'gw'" in rig.events("rejected")[-1]["reason"]

        kept = tmp_path / "directive-2"
        allowed = with_directive(kit, fresh(kit, tmp_path, "2"), ["gw"])
        shutil.copytree(allowed, kept)
        assert await rig.ota.install(allowed, stop), rig.events("rejected")
        state = rig.models.read()
        assert (state.active, state.previous) == ("2", "3")
        assert rig.switch.info.version == "2"
        used = rig.events("verified")[-1]["rollback_directive"]
        assert used["id"] in state.directives
        await rig.feed(0, 3)
        await rig.drained()
        assert {r["model"]["version"] for r in rig.outbox("result")} == {"2"}

        assert await rig.ota.install(fresh(kit, tmp_path, "4"), stop)
        replayed = with_directive(kit, fresh(kit, tmp_path, "2"), [], same_as=kept)
        assert not await rig.ota.install(replayed, stop)
        assert f"directive {used['id']} was used already" in rig.events("rejected")[-1]["reason"]
        assert rig.models.read().active == "4"

        # An operator rollback fails 4; it is not retried, unless a directive brings it back.
        rig.models.rollback_request.write_text("rollback\n")
        await rig.ota.scan(stop)
        state = rig.models.read()
        assert (state.active, state.failed["4"]["reason"]) == ("2", "operator rollback")
        assert not await rig.ota.install(fresh(kit, tmp_path, "4"), stop)
        assert "failed before" in rig.events("rejected")[-1]["reason"]
        assert await rig.ota.install(with_directive(kit, fresh(kit, tmp_path, "4"), ["*"]), stop)
        state = rig.models.read()
        assert (state.active, state.previous) == ("4", "2")
        assert "4" not in state.failed


# -- golden sets: expected answers at the canary and in probation ----------------------------

GOLDEN_READINGS = [("sensors/s1/temperature", {"sensor": "s1", "celsius": c})
                   for c in (-5, 12, 20, 33, 47, 58, 61, 74, 86, 99)]
LEVELS = ["normal", "warning", "critical"]


async def answers_of(settings: Settings, gguf: Path) -> list[Any]:
    """What the model at `gguf` answers to GOLDEN_READINGS, asked once the way the pipeline
    asks (its prompt, greedy, the schema): the expected outputs of an honest golden set."""
    route = settings.routes[0]
    worker = InferenceWorker(settings.model.model_copy(update={"path": gguf}),
                             ModelInfo("probe", "0", "", str(gguf)))
    await worker.start()
    try:
        outputs = []
        for topic, reading in GOLDEN_READINGS:
            completion = await worker.complete(
                build_messages(route, topic, json.dumps(reading)),
                Generation(route.max_tokens, 0.0, settings.model.seed, route.output_schema,
                           prefix_key(route)))
            outputs.append(json.loads(completion.text))
    finally:
        await worker.close()
    return outputs


def golden_package(kit: dict[str, Any], tmp_path: Path, settings: Settings, version: str,
                   expected: list[Any], floor: float = 0.95) -> Path:
    """Package `version` (the GGUF otakit makes for it) with a golden set of `expected`
    outputs for GOLDEN_READINGS, copied into this test's incoming/."""
    work = kit["work"] / f"golden-{tmp_path.name}"
    golden = write_golden(work / f"eval-{version}" / "eval-temperature.jsonl",
                          [(t, r, e) for (t, r), e in zip(GOLDEN_READINGS, expected, strict=True)])
    src = package(work, kit["key"], version, seed=int(version),
                  golden=[("temperature", golden, floor)])
    dst = tmp_path / "state" / "incoming" / f"golden-{version}"
    shutil.copytree(src, dst)
    return dst


def model_file(kit: dict[str, Any], tmp_path: Path, version: str) -> Path:
    """The GGUF otakit generates for `version` (deterministic for its seed)."""
    return package(kit["work"] / f"probe-{tmp_path.name}", kit["key"], version,
                   seed=int(version)) / f"tiny-ota-{version}.gguf"


def wrong(outputs: list[Any]) -> list[Any]:
    """Each expected output replaced by another level than the model gives."""
    return [{"level": LEVELS[(LEVELS.index(o["level"]) + 1) % 3]} for o in outputs]


async def test_a_candidate_that_answers_its_golden_set_passes_and_the_figures_are_kept(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """Expected outputs taken from the model itself: the canary scores them right (1.0 on 10
    readings), probation asks them again through the serving worker, the version commits, and
    both figures reach the events, the state (`model list`) and the retained status."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], probation_requests=4,
                             probation_golden_items=5)
    expected = await answers_of(settings, model_file(kit, tmp_path, "2"))
    pkg = golden_package(kit, tmp_path, settings, "2", expected)
    async with running(settings) as rig:
        install = asyncio.create_task(rig.ota.install(pkg, asyncio.Event()))
        sent = 0
        while not install.done():
            await rig.feed(sent, 1)
            sent += 1
            await asyncio.sleep(0.05)
        assert install.result() is True, rig.events("refused") + rig.events("rolled_back")
        await rig.drained()
        checked = {e["stage"]: e for e in rig.events("golden_checked")}
        canary = checked["canary"]["figures"]["golden"][0]
        assert (canary["route"], canary["n"], canary["right"], canary["floor"]) == (
            "temperature", 10, 10, 0.95)
        assert canary["accuracy"] == 1.0
        assert canary["misses"] == []
        probation = checked["probation"]["figures"]["golden"][0]
        assert (probation["n"], probation["right"]) == (5, 5)
        assert rig.events("canary_passed")[0]["figures"]["golden"] == [canary]
        assert rig.events("committed")[0]["figures"]["golden"] == [probation]
        state = rig.models.read()
        assert state.active == "2"
        assert state.installed["2"]["golden"] == {"canary": [canary], "probation": [probation]}
        line = next(x for x in summary(state.to_json(), "tiny", "1") if x.startswith("2 "))
        assert ", active; golden canary temperature 1.000 (10/10, floor 0.95), probation " \
            "temperature 1.000 (5/5, floor 0.95)" in line, line
        status = [s for s in rig.outbox("status") if "state_active" in s][-1]
        assert status["golden"]["canary"][0]["accuracy"] == 1.0
        results = rig.outbox("result")
        assert len({r["id"] for r in results}) == sent
        assert all(r["status"] == "ok" for r in results)


async def test_a_candidate_under_its_golden_floor_is_refused_with_the_figure(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """The same model with every expected output wrong: schema-valid and fast, so the old
    canary would pass it; the golden set refuses it with the accuracy in the reason, and the
    old model keeps serving. `golden_max_items` 6 asks an even spread of the 10 items."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], golden_max_items=6)
    expected = wrong(await answers_of(settings, model_file(kit, tmp_path, "2")))
    pkg = golden_package(kit, tmp_path, settings, "2", expected)
    async with running(settings) as rig:
        assert not await rig.ota.install(pkg, asyncio.Event())
        refused = rig.events("refused")[0]
        assert refused["stage"] == "canary"
        assert refused["reason"] == ("accuracy 0 on 6 golden readings of route temperature, "
                                     "under the manifest's floor 0.95")
        golden = refused["figures"]["golden"][0]
        assert (golden["n"], golden["right"], len(golden["misses"])) == (6, 0, 3)
        # The spread of 6 out of 10 asks items 0, 1, 3, 5, 6, 8: the misses shown are the first.
        assert [m["expected"] for m in golden["misses"]] == [expected[i] for i in (0, 1, 3)]
        assert [json.loads(m["reading"]) for m in golden["misses"]] == [
            GOLDEN_READINGS[i][1] for i in (0, 1, 3)]
        assert all(m["answer"] != m["expected"] for m in golden["misses"])
        assert refused["figures"]["answers"], "the schema and latency canary ran first"
        assert rig.events("canary_passed") == []
        state = rig.models.read()
        assert (state.active, state.trial) == ("base", None)
        assert state.failed["2"]["figures"]["golden"] == [golden]
        line = next(x for x in summary(state.to_json(), "tiny", "1") if x.startswith("2 "))
        assert f"FAILED at {state.failed['2']['step']}: accuracy 0 on 6 golden readings" in line
        assert line.endswith("; golden canary temperature 0.000 (0/6, floor 0.95)"), line
        assert rig.switch.info.version == "1"
        await rig.feed(0, 2)
        await rig.drained()
        assert {r["model"]["version"] for r in rig.outbox("result")} == {"1"}


async def test_a_probation_under_the_golden_floor_rolls_back(
    kit: dict[str, Any], tmp_path: Path, tiny_model: Path
) -> None:
    """Version 2 is serving on probation (a graceful stop left the trial open, so the canary
    is behind it) with a golden set it answers wrong: at the end of probation the serving
    worker is asked the set, the verdict fails with the figure and version 1 serves again."""
    settings = make_settings(tmp_path, tiny_model, kit["public"], probation_requests=3,
                             probation_golden_items=4)
    expected = wrong(await answers_of(settings, model_file(kit, tmp_path, "2")))
    pkg = golden_package(kit, tmp_path, settings, "2", expected)
    models = ModelStore(settings.ota_dir)
    models.stage(modelpkg.verify_blocking(pkg, [kit["public"]]))

    def on_probation(state: Any) -> None:
        state.trial.phase, state.trial.stopped = "probation", True
        state.active, state.previous = "2", "base"

    models.update(on_probation)
    stop = asyncio.Event()
    async with running(settings) as rig:
        assert rig.switch.info.version == "2"
        agent_ota = asyncio.create_task(rig.ota.run(stop, []))
        sent = 0
        while not rig.events("rolled_back"):
            assert not agent_ota.done(), agent_ota
            await rig.feed(sent, 1)
            sent += 1
            await asyncio.sleep(0.1)
        stop.set()
        await agent_ota
        rolled = rig.events("rolled_back")[0]
        assert rolled["stage"] == "probation"
        assert rolled["reason"] == ("accuracy 0 on 4 golden readings of route temperature, "
                                    "under the manifest's floor 0.95")
        assert rolled["figures"]["golden"][0]["n"] == 4
        assert rolled["figures"]["candidate"]["requests"] >= 3
        assert rig.switch.info.version == "1"
        state = rig.models.read()
        assert (state.active, state.trial) == ("base", None)
        assert "accuracy 0 on 4" in state.failed["2"]["reason"]
        await rig.feed(sent, 2)
        await rig.drained()
        results = rig.outbox("result")
        assert all(r["status"] == "ok" for r in results)
        assert results[-1]["model"]["version"] == "1"
