"""The CPU priority of a candidate worker (issue 16): SCHED_IDLE while it loads and answers its
canary and golden set, SCHED_OTHER again before it takes traffic.

A candidate shares the two cores with the serving worker; at the same priority the two workers'
llama.cpp threads, spinning at OpenMP barriers, slowed each other down together, and readings
waited seconds behind a canary that takes 10 ms alone. Under SCHED_IDLE the scheduler runs the
candidate only on a core nothing else wants, and a waking serving thread preempts it at once (a
nice 19 task keeps a share of a busy core). Idle threads still cost the serving worker some
time (docs/ota.md has the figures). `python -m
agent.inference.priority WORKER-ARGS` is the candidate's command: it goes idle before the
worker's imports (llama_cpp, numpy: about 0.25 CPU-seconds) and runs the worker, whose threads
all inherit the policy.

Going idle is always allowed, but coming back is not: the kernel (sched_setscheduler(2), its
can_nice()) lets a thread leave SCHED_IDLE only with CAP_SYS_NICE or RLIMIT_NICE >= 20 - nice,
and the hardened unit has no capabilities (it sets LimitNICE=+0 for this). A worker that could not
come back would serve for ever at idle priority, so `go_idle` first tries the round trip on a
throw-away thread, under exactly this process's credentials, limits and seccomp filter, and
stays at normal priority when it fails.

Runs in the worker process (agent/inference/worker.py), which changes only its own threads;
imports nothing heavy, so that it runs before llama_cpp is imported.
"""

from __future__ import annotations

import os
import resource
import runpy
import sys
import threading
from pathlib import Path

# <linux/sched.h>: what sched_setscheduler(2) takes and /proc/<pid>/task/<tid>/stat reports in
# its `policy` field (0 and 5).
SCHED_OTHER = os.SCHED_OTHER
SCHED_IDLE = os.SCHED_IDLE


def return_refusal(nice: int, nice_limit: int) -> str | None:
    """Why a thread at `nice` could not leave SCHED_IDLE with RLIMIT_NICE `nice_limit` and no
    CAP_SYS_NICE, or None if it could (can_nice(): 20 - nice <= RLIMIT_NICE)."""
    needed = 20 - nice
    if nice_limit == resource.RLIM_INFINITY or needed <= nice_limit:
        return None
    return (f"it needs CAP_SYS_NICE or RLIMIT_NICE >= {needed} (20 - nice {nice}); "
            f"RLIMIT_NICE is {nice_limit}: set LimitNICE=+{max(nice, 0)} in the unit")


def thread_policies(pid: int | str = "self") -> dict[int, int]:
    """The scheduling policy of each thread of `pid` (field 41 of /proc/<pid>/task/<tid>/stat),
    by thread id; threads that exit while being read are left out."""
    policies: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command name (which may hold spaces and parentheses) come fields 3 on.
        fields = stat[stat.rindex(")") + 2:].split()
        policies[int(task.name)] = int(fields[41 - 3])
    return policies


def _own_nice() -> int:
    # Field 19 of /proc/self/stat, not getpriority(2): no system call the unit may filter.
    fields = Path("/proc/self/stat").read_text()
    return int(fields[fields.rindex(")") + 2:].split()[19 - 3])


def round_trip_refusal() -> str | None:
    """Move a throw-away thread to SCHED_IDLE and back: None if both steps worked (so this
    process, and a child with its credentials and limits, may go idle and come back), else why
    one failed."""
    done = threading.Event()
    probe = threading.Thread(target=done.wait, name="sched-probe", daemon=True)
    probe.start()
    assert probe.native_id is not None
    try:
        try:
            os.sched_setscheduler(probe.native_id, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            return (f"going to SCHED_IDLE failed ({exc.strerror}): the unit's "
                    "SystemCallFilter= must allow sched_setscheduler")
        try:
            os.sched_setscheduler(probe.native_id, os.SCHED_OTHER, os.sched_param(0))
        except OSError as exc:
            limit, _ = resource.getrlimit(resource.RLIMIT_NICE)
            return (f"leaving SCHED_IDLE failed ({exc.strerror}): "
                    f"{return_refusal(_own_nice(), limit) or 'CAP_SYS_NICE or RLIMIT_NICE'}")
    finally:
        done.set()
        probe.join()
    return None


def go_idle() -> str | None:
    """Put every thread of this process under SCHED_IDLE (`main` calls it before the worker's
    imports: threads started later inherit the policy); None if it did, else why it stays at
    normal priority."""
    refused = round_trip_refusal()
    if refused is not None:
        return refused
    try:
        _set_all(SCHED_IDLE)
    except OSError as exc:  # not seen: the round trip had the same rights
        return_to_normal()
        return f"going to SCHED_IDLE failed: {exc}"
    return None


def return_to_normal() -> int:
    """Put every thread of this process back under SCHED_OTHER (nice unchanged) and check that
    none is left idle; the number of threads. OSError if one could not be moved."""
    return _set_all(SCHED_OTHER)


def _set_all(policy: int) -> int:
    for tid, current in thread_policies().items():
        if current != policy:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:  # the thread exited meanwhile
                continue
    policies = thread_policies()
    left = sorted(tid for tid, current in policies.items() if current != policy)
    if left:
        raise OSError(f"threads {left} did not take scheduling policy {policy}")
    return len(policies)


def scheduling() -> str:
    """"idle" while a thread of this process is under SCHED_IDLE, else "normal"."""
    return "idle" if SCHED_IDLE in thread_policies().values() else "normal"


def main() -> None:
    """Go idle, then run the worker with this command's arguments, and the reason when this
    process could not go idle (the worker's ready line reports it)."""
    refused = go_idle()
    sys.argv = ["agent.inference.worker", *sys.argv[1:],
                *(["--yield-refused", refused] if refused else [])]
    runpy.run_module("agent.inference.worker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
