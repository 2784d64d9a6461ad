"""The agent's error classes, classified once: transient (retry with backoff) or permanent.

This module owns the vocabulary only; it imports nothing from the rest of the agent. Adapters
translate library exceptions into these where the library is called (`raise ... from exc`).
"""

from __future__ import annotations

# sysexits.h EX_CONFIG: systemd's unit sets RestartPreventExitStatus=78 so a bad file is not
# restarted in a loop.
EXIT_CONFIG = 78


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration cannot be used. The message names the file and the key."""


class TransientError(AgentError):
    """Worth retrying after a backoff: a peer is down, a worker died, a deadline passed."""


class PermanentError(AgentError):
    """Retrying cannot help: the input or the model is bad. The item is dead-lettered."""


class Unavailable(TransientError):
    """No executor can take readings now: the model does not load, the cloud is unreachable or
    its circuit is open. Not the reading's fault: it goes back to the inbox without counting an
    attempt, and the pipeline waits until an executor answers again."""


class WorkerCrashed(TransientError):
    """The inference worker process exited while a request was in flight."""


class WorkerTimeout(TransientError):
    """The inference worker missed the per-request deadline and was killed."""


class ModelLoadError(Unavailable):
    """llama.cpp refused the model file; the message carries the worker's reason. At start-up
    it ends the agent; while serving, readings wait in the inbox until a model answers."""


class StoreFull(TransientError):
    """SQLite reported the disk or database full; input must stop being acked until it clears."""


class StoreUnavailable(StoreFull):
    """A store write failed for a reason that may pass (locked, an I/O error): handled like a
    full store, so input waits and the pipeline and the uplink retry."""


class StoreDamaged(AgentError):
    """SQLite found the store's file damaged (SQLITE_CORRUPT, SQLITE_NOTADB): not a reading's
    fault and not worth a retry; the agent stops, and the next start quarantines the file."""


class StoreUnreadable(PermanentError):
    """A read-only look at the store (the operator's commands) failed: no file, not a store."""


class OutboxFull(StoreFull):
    """The outbox is at its configured bound and the policy is to refuse new input."""
