"""The composition root: builds the components, owns every task in one TaskGroup, and runs the
named start-up and shutdown phases.

Start-up: open the store -> load the model in the worker and make it answer a probe -> start
ingest, pipeline and uplink -> `agent_ready` once ingest has subscribed.
Shutdown on SIGTERM/SIGINT, under `agent.drain_timeout_s`: stop taking input -> finish the
reading in hand -> flush the outbox to the cloud -> stop the worker -> close the store.
A second signal, or the deadline, cancels whatever is still running; unsent rows stay in the
store for the next start.
"""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from agent import ota
from agent.config import Settings
from agent.inference import InferenceWorker
from agent.ingest import Ingest
from agent.messages import Topics
from agent.otastate import ModelStore
from agent.pipeline import Pipeline
from agent.serving import Router
from agent.store import Store
from agent.uplink import Uplink
from agent.watcher import Watcher

log = structlog.get_logger()

PROBE_MESSAGES = [{"role": "user", "content": "ping"}]


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0

    def request_stop(self, signame: str = "SIGTERM") -> None:
        """First call starts the graceful drain; a second forces the stop."""
        self._signals += 1
        if self._signals == 1:
            log.info("agent_stopping", signal=signame,
                     drain_timeout_s=self.settings.agent.drain_timeout_s)
            self._stop_requested.set()
        else:
            log.warning("agent_stop_forced", signal=signame)
            self._force.set()

    async def run(self) -> None:
        started = time.monotonic()
        settings = self.settings
        store = await Store.open(settings.store_path)
        router: Router | None = None
        try:
            log.info("store_opened", path=str(settings.store_path), **await store.depths())
            models = ModelStore(settings.ota_dir)
            # Counts this start against a model on trial and rolls back if it must.
            startup = await ota.startup(settings, models)
            info = startup.info
            worker = InferenceWorker(startup.section, info)
            router = Router(worker)
            await worker.start()
            probe = await worker.complete(PROBE_MESSAGES, max_tokens=1, temperature=0.0,
                                          seed=settings.model.seed, schema=None)
            log.info("model_answered", model=info.name, version=info.version,
                     sha256=info.sha256, probe_ms=round(probe.latency_ms, 1))
            await self._serve(store, router, started, models, startup)
        finally:
            if router is not None:
                await router.serving.worker.close()
            await store.close()
            log.info("agent_stopped")

    async def _serve(self, store: Store, router: Router, started: float, models: ModelStore,
                     startup: ota.Startup) -> None:
        settings = self.settings
        topics = Topics(settings.cloud_broker.topic_prefix, settings.agent.device_id)
        ingest = Ingest(settings, store, topics)
        pipeline = Pipeline(settings, store, router, topics)
        uplink = Uplink(settings, store)
        updates = ota.Ota(settings, store, router, topics, models)
        watcher = Watcher(settings.incoming_dir, [settings.ota_dir], updates.wake,
                          settings.ota.watch_debounce_s)
        stop_pipeline = asyncio.Event()
        stop_uplink = asyncio.Event()
        stop_ota = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            ota_task = tasks.create_task(updates.run(stop_ota, startup.reports), name="ota")
            tasks.create_task(watcher.run(stop_ota), name="ota-watcher")
            ingest_task = tasks.create_task(ingest.run(), name="ingest")
            pipeline_task = tasks.create_task(pipeline.run(stop_pipeline), name="pipeline")
            uplink_task = tasks.create_task(uplink.run(stop_uplink), name="uplink")
            ready_task = tasks.create_task(self._announce_ready(ingest, started), name="ready")
            await self._stop_requested.wait()
            deadline = time.monotonic() + settings.agent.drain_timeout_s
            ready_task.cancel()
            # Phase 1: stop taking input. Unacked messages stay with the local broker.
            ingest_task.cancel()
            # A model update stops between steps; a trial left open is judged at the next start.
            stop_ota.set()
            if not await self._within(ota_task, deadline):
                ota_task.cancel()
            # Phase 2: finish the reading in hand. Phase 3: flush the outbox.
            stop_pipeline.set()
            if not await self._within(pipeline_task, deadline):
                pipeline_task.cancel()
            stop_uplink.set()
            if not await self._within(uplink_task, deadline):
                uplink_task.cancel()
            log.info("agent_drained", delivered_this_run=uplink.delivered, **await store.depths())

    async def _within(self, task: asyncio.Task[None], deadline: float) -> bool:
        """Wait for the task until the deadline or a forcing signal; True if it finished."""
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait([task, force], timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
        return task.done()

    async def _announce_ready(self, ingest: Ingest, started: float) -> None:
        await ingest.subscribed.wait()
        log.info("agent_ready", startup_s=round(time.monotonic() - started, 3))


async def run(settings: Settings) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    agent = Agent(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop, signal.Signals(signum).name)
    try:
        await agent.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
