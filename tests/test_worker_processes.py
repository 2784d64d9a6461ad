"""The inference worker never outlives the agent that started it, on real parts: an agent killed
uncleanly (SIGKILL) takes its worker with it, even a worker that is stopped or hung."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import Rig
from tests.harness import wait_until


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an unreaped corpse runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def test_an_agent_killed_uncleanly_leaves_no_worker_behind(rig: Rig) -> None:
    """SIGKILL of the agent while its worker is SIGSTOPped (so it cannot notice EOF on its
    stdin): the kernel kills the worker too, instead of leaving it to the next start."""
    rig.local.start()
    agent = rig.agent()
    agent.wait_for_event("agent_ready")
    worker = int(agent.wait_for_event("worker_ready")["pid"])
    os.kill(worker, signal.SIGSTOP)
    try:
        agent.kill()
        wait_until(lambda: not alive(worker), 30, f"worker {worker} to die with its agent")
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
