"""The demo's own parts (tools/demo.py): sensors that publish until told to stop, waits that
say what they waited for, the log tail it shows, the processes it must not leave behind, and its
models (tools/demo_models.py): students trained once per machine into a cache keyed by what makes
them, a better one that clears the golden floor the demo ships it with, and a clear error naming
the [train] extra when one must be trained without PyTorch. The whole demo runs in .ci/run
(tools/demo)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.base.digest import sha256_file
from tests.conftest import Rig
from tests.harness import REPO, TEST_ROUTES, AgentProcess, Mosquitto, wait_until, write_agent_config
from tools import demo_models
from tools.demo import GOLDEN_FLOOR, AgentLog, Sensors, WaitFailed, Waits, main, users_of


def test_the_sensors_keep_publishing_until_stopped(rig: Rig) -> None:
    """Started sensors publish `rate` readings a tick, past any fixed burst, until stop()."""
    rig.local.start()
    received: list[dict[str, Any]] = []
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with lock:
            received.append(json.loads(message.payload))

    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-listener")
    listener.on_message = on_message
    listener.on_subscribe = lambda *args: subscribed.set()
    listener.connect("127.0.0.1", rig.local.port)
    listener.loop_start()
    listener.subscribe("sensors/#", qos=1)
    assert subscribed.wait(30)
    sensors = Sensors(rig.local.port, rate=5)
    try:
        sensors.start()
        wait_until(lambda: sensors.sent >= 15, 60, "three ticks of readings")
        sensors.stop()
        sent = sensors.sent
        wait_until(lambda: len(received) >= sent, 60, "every reading at the listener")
    finally:
        sensors.close()
        listener.disconnect()
        listener.loop_stop()
    assert sent % 5 == 0
    assert sorted(body["seq"] for body in received) == list(range(sent))
    assert sensors.sent == sent


def test_a_wait_that_gives_up_says_what_it_waited_for_and_what_it_saw(tmp_path: Path) -> None:
    """A timed-out wait names its subject and what was seen so far."""
    log = tmp_path / "agent.log"
    waits = Waits(AgentProcess(tmp_path / "agent.toml", log), AgentLog(log))
    with pytest.raises(WaitFailed) as failed:
        waits.until("version 3's verdict", lambda: False, 1.0, lambda: "steps ['loaded']")
    assert str(failed.value) == ("timed out after 1 s waiting for version 3's verdict; "
                                 "seen so far: steps ['loaded']")


def test_a_wait_ends_when_the_agent_exits(tmp_path: Path) -> None:
    """A wait does not sit out its timeout once the agent has exited; it says with what code."""
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nno_such_key = 1\n")
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    waits = Waits(agent, AgentLog(agent.log_path))
    try:
        with pytest.raises(WaitFailed, match=r"the agent exited with 78 while the demo waited "
                           r"for the agent's agent_ready event"):
            waits.event("agent_ready", 120)
    finally:
        agent.kill()


def test_the_log_tail_leaves_out_debug_lines(tmp_path: Path) -> None:
    """The tail shown on failure keeps info-and-above events and non-JSON lines only."""
    path = tmp_path / "agent.log"
    lines = [json.dumps({"event": f"e{i}", "level": "debug" if i % 2 else "info"})
             for i in range(10)]
    path.write_text("\n".join([*lines, "Traceback (most recent call last):"]) + "\n")
    tail = AgentLog(path).tail(3)
    assert [json.loads(line)["event"] for line in tail[:2]] == ["e6", "e8"]
    assert tail[2] == "Traceback (most recent call last):"


def test_a_process_left_behind_by_a_child_is_adopted_and_ended() -> None:
    """An orphan of the demo's child is re-parented to the demo, which finds and ends it."""
    script = (
        "import subprocess\n"
        "from tools.demo import adopt_orphans, children, end_processes\n"
        "adopt_orphans()\n"
        "out = subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'],\n"
        "                     capture_output=True, text=True, check=True).stdout\n"
        "pid = int(out)\n"
        "print(pid, flush=True)\n"
        "left = children()\n"
        "assert pid in left, left\n"
        "end_processes({pid: left[pid]})\n"
        "assert pid not in children()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    pid = int(done.stdout.split()[0]) if done.stdout.strip() else None
    try:
        assert done.returncode == 0, done.stderr
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        if pid is not None and done.returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_the_demo_refuses_a_state_dir_an_earlier_demo_still_uses(tmp_path: Path) -> None:
    """A broker of an earlier demo still running in demo-state/: exit 2, nothing removed."""
    work = tmp_path / "demo-state"
    broker = Mosquitto("local", work).start()
    marker = work / "keep-me"
    marker.write_text("x")
    try:
        assert broker.proc is not None
        assert broker.proc.pid in users_of(work)
        assert main(["--workdir", str(work)]) == 2
        assert marker.exists()
    finally:
        broker.stop()
    assert users_of(work) == {}


def demo_config(path: Path, routes: str = TEST_ROUTES) -> Path:
    """A configuration with the demo's route (the demo writes its own the same way)."""
    return write_agent_config(path, state_dir=path.parent / "state",
                              model_path=path.parent / "m.gguf", local_port=1, cloud_port=2,
                              routes=routes)


def test_a_student_is_keyed_by_all_that_makes_it(tmp_path: Path) -> None:
    """The cache key is stable, and changes with the recipe, the rule and the route's prompt."""
    route = demo_models.route_of(demo_config(tmp_path / "a.toml"))
    other = demo_models.route_of(demo_config(tmp_path / "b.toml", TEST_ROUTES.replace(
        "Classify the temperature reading", "Classify the temperature")))
    quick = demo_models.key(route, demo_models.QUICK)
    assert quick == demo_models.key(demo_models.route_of(demo_config(tmp_path / "c.toml")),
                                    demo_models.QUICK)
    assert len({quick, demo_models.key(route, demo_models.BETTER),
                demo_models.key(route, demo_models.QUICK, "celsius<50:normal,else:critical"),
                demo_models.key(other, demo_models.QUICK)}) == 4


def test_the_code_digest_ignores_comments_and_docstrings_only(tmp_path: Path) -> None:
    """Rewording a comment or a docstring keeps the key; changing code does not."""
    path = tmp_path / "m.py"
    path.write_text('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1  # one\n')
    first = demo_models.code_digest([path])
    path.write_text('"""Other."""\n\n\ndef f(x):\n    """Other."""\n    return x + 1\n')
    assert demo_models.code_digest([path]) == first
    path.write_text('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 2  # one\n')
    assert demo_models.code_digest([path]) != first


def test_a_cached_student_whose_file_changed_is_not_used(tmp_path: Path) -> None:
    """A cache entry is used only if its GGUF still has the recorded sha256."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF one")
    record = {"file": "m.gguf", "sha256": sha256_file(tmp_path / "m.gguf"), "accuracy": 0.9,
              "n_eval": 300, "steps": 400}
    (tmp_path / demo_models.RECORD).write_text(json.dumps(record))
    cached = demo_models.load_cached(tmp_path)
    assert cached is not None
    assert cached.cached
    assert cached.accuracy == 0.9
    (tmp_path / "m.gguf").write_bytes(b"GGUF two")
    assert demo_models.load_cached(tmp_path) is None


def test_without_torch_the_demo_names_the_train_extra(tmp_path: Path) -> None:
    """With no cached model and PyTorch not importable, the demo exits 1 naming [train]."""
    script = ("import sys\n"
              "sys.modules['torch'] = None  # what an install without [train] has\n"
              "from tools.demo import main\n"
              f"raise SystemExit(main(['--workdir', {str(tmp_path / 'work')!r}]))\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: the demo trains its models once per machine" in done.stdout
    assert "[train]" in done.stdout
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_the_demo_students_train_once_and_the_better_clears_the_golden_floor(
        tmp_path: Path) -> None:
    """The demo's two students from the machine's cache (trained here if it is empty, as the
    demo would): a second call trains nothing and returns the same files; the cached q8_0
    files score on their held-out set, through llama.cpp now, what was recorded at training;
    version 2 beats version 1 and clears the floor the demo ships it with."""
    pytest.importorskip("torch")
    from agent.specialize.evaluate import evaluate
    from agent.specialize.examples import read_jsonl

    config = demo_config(tmp_path / "agent.toml")
    quick, better = demo_models.students(config, [demo_models.QUICK, demo_models.BETTER])
    again = demo_models.students(config, [demo_models.QUICK, demo_models.BETTER],
                                 say=lambda _: pytest.fail("trained again"))
    assert all(s.cached for s in again)
    assert [s.gguf for s in again] == [quick.gguf, better.gguf]
    route = demo_models.route_of(config)
    held = read_jsonl(better.eval_set)
    assert len(held) == better.n_eval == quick.n_eval
    assert quick.eval_set.read_text() == better.eval_set.read_text()
    for student in (quick, better):
        scores = evaluate("q8_0", student.gguf, route, held, n_ctx=512, n_threads=1)
        assert scores.accuracy == student.accuracy
        assert scores.schema_valid == 1.0
    assert better.accuracy >= GOLDEN_FLOOR
    assert better.accuracy > quick.accuracy
