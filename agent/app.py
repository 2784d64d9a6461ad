"""The composition root: builds the components, owns every task in one TaskGroup, and runs the
named start-up and shutdown phases.

Start-up: open the store -> load the model in the worker and make it answer a probe -> READY=1
to systemd -> start ingest, pipeline, uplink, the watchdog, the status sampler and the metrics
endpoint -> `agent_ready` once ingest has subscribed.
STOPPING=1 goes to systemd on the first SIGTERM/SIGINT.
Shutdown on SIGTERM/SIGINT, under `agent.drain_timeout_s`: stop taking input -> finish the
reading in hand -> flush the outbox to the cloud -> stop the worker -> close the store.
A second signal, or the deadline, cancels whatever is still running; unsent rows stay in the
store for the next start.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from agent.base.errors import ConfigError
from agent.base.records import Generation, QueueStats
from agent.base.retry import OutageEvents, OutageLog
from agent.config import reload
from agent.config.settings import Settings, load, service_environment
from agent.flows.executors import Executors
from agent.flows.ingest import Ingest
from agent.flows.offload import CircuitBreaker
from agent.flows.pipeline import Pipeline
from agent.flows.uplink import Uplink
from agent.inference.cloud import CloudModel
from agent.inference.supervisor import InferenceWorker
from agent.inference.switch import WorkerSwitch
from agent.ota.remote import ModelCommands
from agent.ota.startup import Startup, decide_startup
from agent.ota.state import ModelStore
from agent.ota.updates import Ota
from agent.ota.watcher import Watcher
from agent.routing.outbound import Topics
from agent.service.metrics import Endpoint, Metrics
from agent.service.sdnotify import Notifier
from agent.service.systemd import Service, summary_line
from agent.store.writer import Store
from agent.transport import mqtt

SAMPLE_EVENTS = OutageEvents(
    "status_sample_failed", "status_sample_failing",
    "status_sample_recovered",
)

log = structlog.get_logger()

PROBE_MESSAGES = [{"role": "user", "content": "ping"}]
# Metrics and systemd's STATUS= line are refreshed from a store snapshot this often.
SAMPLE_INTERVAL_S = 2.0


class Agent:
    def __init__(self, settings: Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self._config_path = config_path
        self._reload_requested = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        env = service_environment()
        self._notifier = Notifier(env.notify_socket)
        self.service = Service(settings.service, env, self._notifier)
        self.metrics = Metrics()
        self._stats: QueueStats | None = None
        self._cloud: CloudModel | None = None
        self._executors: Executors | None = None

    def request_reload(self) -> None:
        """SIGHUP: reload routes and limits from the configuration file (see
        agent/config/reload.py)."""
        log.info("config_reload_requested", path=str(self._config_path))
        self._reload_requested.set()

    def request_stop(self, signame: str = "SIGTERM") -> None:
        """First call starts the graceful drain; a second forces the stop."""
        self._signals += 1
        if self._signals == 1:
            log.info("agent_stopping", signal=signame,
                     drain_timeout_s=self.settings.agent.drain_timeout_s)
            self.service.stopping()
            self._stop_requested.set()
        else:
            log.warning("agent_stop_forced", signal=signame)
            self._force.set()

    async def run(self) -> None:
        started = time.monotonic()
        settings = self.settings
        for name in ("local_broker", "cloud_broker"):
            broker = getattr(settings, name)
            if broker.tls:
                mqtt.tls_context(broker, name)  # a bad TLS file is a ConfigError (exit 78) now
        store = await Store.open(settings.store_path, settings.store)
        switch: WorkerSwitch | None = None
        try:
            log.info("store_opened", path=str(settings.store_path), **await store.depths())
            models = ModelStore(settings.ota_dir)
            # Counts this start against a model on trial and rolls back if it must.
            startup = await decide_startup(settings, models)
            info = startup.info
            worker = InferenceWorker(startup.section, info)
            switch = WorkerSwitch(worker)
            await worker.start()
            probe = await worker.complete(PROBE_MESSAGES,
                                          Generation(1, 0.0, settings.model.seed))
            log.info("model_answered", model=info.name, version=info.version,
                     sha256=info.sha256, probe_ms=round(probe.latency_ms, 1))
            self._executors = self._build_executors(store)
            self.metrics.active_model(info)
            self._stats = await store.stats()
            self.service.ready(summary_line(f"{info.name} v{info.version}", self._stats,
                                            local_up=False, cloud_up=False))
            log.info("service_ready", startup_s=round(time.monotonic() - started, 3),
                     notify_socket=self._notifier.enabled)
            await self._serve(store, switch, started, models, startup)
        finally:
            if self._cloud is not None:
                await self._cloud.aclose()
            if switch is not None:
                await switch.serving.worker.close()
            await store.close()
            self._notifier.close()
            log.info("agent_stopped")

    async def _serve(self, store: Store, switch: WorkerSwitch, started: float, models: ModelStore,
                     startup: Startup) -> None:
        settings = self.settings
        topics = Topics(settings.cloud_broker.topic_prefix, settings.agent.device_id)
        ingest = Ingest(settings, store, topics, observer=self.metrics)
        pipeline = Pipeline(settings, store, switch, topics, observer=self.metrics,
                            executors=self._executors)
        uplink = Uplink(settings, store, topics,
                        status=lambda: self._status_body(ingest, uplink, switch))
        updates = Ota(settings, store, switch, topics, models)
        watcher = Watcher(settings.incoming_dir, [settings.ota_dir], updates.wake,
                          settings.ota.watch_debounce_s)
        commands = ModelCommands(settings, updates, topics)
        stop_pipeline = asyncio.Event()
        stop_uplink = asyncio.Event()
        stop_ota = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            ota_task = tasks.create_task(updates.run(stop_ota, startup.reports), name="ota")
            tasks.create_task(watcher.run(stop_ota), name="ota-watcher")
            ingest_task = tasks.create_task(ingest.run(), name="ingest")
            commands_task = tasks.create_task(commands.run(), name="model-commands")
            pipeline_task = tasks.create_task(pipeline.run(stop_pipeline), name="pipeline")
            uplink_task = tasks.create_task(uplink.run(stop_uplink), name="uplink")
            ready_task = tasks.create_task(self._announce_ready(ingest, started), name="ready")
            reload_task = tasks.create_task(self._reload_on_request(ingest, pipeline),
                                            name="reloader")
            self.service.watch([ingest.liveness, pipeline.liveness, uplink.liveness,
                                _ServingWorker(switch)])
            observers = [
                tasks.create_task(self.service.run_watchdog(), name="watchdog"),
                tasks.create_task(self._sample(store, ingest, uplink, switch), name="sampler"),
            ]
            if settings.service.metrics_enabled:
                endpoint = Endpoint(self.metrics, lambda: self._not_ready(store, switch))
                observers.append(tasks.create_task(
                    endpoint.serve(settings.service.metrics_host, settings.service.metrics_port),
                    name="metrics"))
            await self._stop_requested.wait()
            deadline = time.monotonic() + settings.agent.drain_timeout_s
            ready_task.cancel()
            reload_task.cancel()
            # Phase 1: stop taking input. Unacked messages stay with the local broker.
            ingest_task.cancel()
            # A download cut here resumes from its partial file at the next start.
            commands_task.cancel()
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
            for task in observers:
                task.cancel()

    def _build_executors(self, store: Store) -> Executors:
        """Issue 6: the cloud client (if configured) and the policy that chooses per reading."""
        section = self.settings.cloud_model
        if section.base_url is None:
            return Executors()
        self._cloud = CloudModel(section)
        log.info("cloud_model_configured", base_url=section.base_url, model=section.model,
                 routes={r.name: r.executor for r in self.settings.routes})

        async def inbox_depth() -> int:
            return (await store.depths())["inbox"]

        breaker = CircuitBreaker(section.failure_threshold, section.cooldown_s)
        return Executors(self._cloud, breaker, inbox_depth)

    async def _within(self, task: asyncio.Task[None], deadline: float) -> bool:
        """Wait for the task until the deadline or a forcing signal; True if it finished."""
        force = asyncio.ensure_future(self._force.wait())
        try:
            await asyncio.wait([task, force], timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
        return task.done()

    async def _sample(
        self, store: Store, ingest: Ingest, uplink: Uplink, switch: WorkerSwitch
    ) -> None:
        """Every SAMPLE_INTERVAL_S: read the store's depths once, then update the metrics and
        systemd's STATUS= line from that snapshot."""
        loops = ["ingest", "pipeline", "uplink", "inference_worker"]
        outage = OutageLog(SAMPLE_EVENTS)
        dropped: dict[str, int] = {}
        while True:
            worker = switch.serving.worker  # changes when a model update is committed
            model = f"{worker.info.name} v{worker.info.version}"
            self.metrics.active_model(worker.info)
            try:
                self._stats = await store.stats()
                counts = await store.depths()
                dropped = {"outbox_full": counts["dropped"] - counts["dropped_ttl"],
                           "ttl": counts["dropped_ttl"]}
                outage.recovered()
            except Exception as exc:  # not the data path: the next tick tries again
                outage.failed(exc)
            if self._stats is not None:
                self.metrics.sample(
                    self._stats,
                    links={"local": (ingest.subscribed.is_set(), ingest.connects),
                           "cloud": (uplink.connected, uplink.connects)},
                    worker_restarts=worker.restarts, model_load_failures=worker.load_failures,
                    dropped=dropped, stalled=self.service.stalled, loops=loops,
                    ready=self._not_ready(store, switch) is None)
            self.service.status(summary_line(
                model, self._stats, local_up=ingest.subscribed.is_set(),
                cloud_up=uplink.connected, stalled=self.service.stalled))
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def _status_body(
        self, ingest: Ingest, uplink: Uplink, switch: WorkerSwitch
    ) -> dict[str, Any]:
        """The JSON summary in the retained MQTT status (uplink adds state and time)."""
        stats = self._stats
        worker = switch.serving.worker
        return {
            "model": {"name": worker.info.name, "version": worker.info.version,
                      "sha256": worker.info.sha256},
            "queues": None if stats is None else {
                "inbox": stats.inbox, "outbox": stats.outbox, "dead_letter": stats.dead_letter,
                "delivered": stats.delivered,
                "oldest_undelivered_s": stats.oldest_undelivered_s},
            "local_link": "up" if ingest.subscribed.is_set() else "down",
            "local_sessions_lost": ingest.sessions_lost,
            "worker_restarts": worker.restarts,
            "stalled": self.service.stalled,
        }

    @staticmethod
    def _not_ready(store: Store, switch: WorkerSwitch) -> str | None:
        if not store.is_open:
            return "store closed"
        worker = switch.serving.worker
        if not worker.answering:
            return f"model unavailable: {worker.unavailable}" if worker.unavailable else (
                "model not answering")
        return None

    async def _reload_on_request(self, ingest: Ingest, pipeline: Pipeline) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            self.service.reloading()
            try:
                await self._reload(ingest, pipeline)
            finally:
                self.service.reloaded()

    async def _reload(self, ingest: Ingest, pipeline: Pipeline) -> None:
        """Apply what can change while running; name, by key, what needs a restart."""
        if self._config_path is None:
            log.warning("config_reload_unsupported", reason="started without a config file")
            return
        try:
            new = await asyncio.to_thread(load, self._config_path)
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc), keeping="the running config")
            return
        keys = reload.changed_keys(self.settings, new)
        merged = reload.merge(self.settings, new)
        pipeline.apply(merged)
        self.settings = merged
        try:
            await ingest.apply(merged)
        except mqtt.LinkDown as exc:
            # The link is broken: ingest reconnects and subscribes from the new routes anyway.
            log.warning("config_reload_resubscribe_failed", error=str(exc))
        log.info("config_reloaded", applied=[k for k in keys if reload.is_reloadable(k)],
                 needs_restart=[k for k in keys if not reload.is_reloadable(k)])

    async def _announce_ready(self, ingest: Ingest, started: float) -> None:
        await ingest.subscribed.wait()
        log.info("agent_ready", startup_s=round(time.monotonic() - started, 3))


async def run(settings: Settings, config_path: Path | None = None) -> None:
    """Run the agent until SIGTERM or SIGINT; SIGHUP reloads routes and limits."""
    agent = Agent(settings, config_path)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop, signal.Signals(signum).name)
    loop.add_signal_handler(signal.SIGHUP, agent.request_reload)
    try:
        await agent.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


class _ServingWorker:
    """The liveness of whichever worker serves traffic now: a model update replaces it."""

    name = "inference_worker"

    def __init__(self, switch: WorkerSwitch) -> None:
        self._switch = switch

    def stalled_for(self, stall_after_s: float) -> float | None:
        return self._switch.serving.worker.liveness.stalled_for(stall_after_s)
