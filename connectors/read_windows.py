"""When a peer may read this worker's memory without a lease the worker knows of.

The transport's UCX progress parks while nothing can need it (connectors/transports/progress.py),
and a peer's READ only completes while the target progresses. The worker knows its own leases and
pulls; two kinds of reads it does not see coming are announced on the side channel instead
(connectors/handshake.py), which opens a **window** here for each:

- a peer **handshakes** (``link``): its first read (a P/D pull, or a peer load after its pin)
  follows, and the UCX endpoint's wire-up needs our progress too; open for the worker's
  ``transfer_timeout_seconds`` (the reader gives up after that);
- a peer **pins** DRAM-tier blocks (``pin:<lease id>``): the pin's lease lives in the scheduler
  process (connectors/peer_serve.py) while the reads land on this worker's NIXL agent; open for
  the lease's seconds, closed when the reader releases it.

The transport stays awake until the latest open window ends (``hold_until``). Windows are bounded:
expired ones are dropped at every change, and past :data:`MAX_WINDOWS` they merge into one (the
latest deadline; the thread then stays awake longer, never shorter).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: open windows kept apart (peer pins are bounded at 1024 by the holder: peer_serve.MAX_LEASES)
MAX_WINDOWS = 2048


class ReadWindows:
    """Named deadlines; ``push(latest deadline)`` after every change (called from any thread)."""

    def __init__(self, push: Callable[[float], None]) -> None:
        self._push = push
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def open(self, key: str, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._until[key] = max(self._until.get(key, 0.0), now + seconds)
            self._changed(now)

    def close(self, key: str) -> None:
        with self._lock:
            if self._until.pop(key, None) is not None:
                self._changed(time.monotonic())

    def __len__(self) -> int:
        return len(self._until)

    def _changed(self, now: float) -> None:
        self._until = {k: t for k, t in self._until.items() if t > now}
        if len(self._until) > MAX_WINDOWS:
            self._until = {"merged": max(self._until.values())}
        self._push(max(self._until.values(), default=0.0))
