"""Background UCX progress for :class:`~.nixl.NixlTransport`, awake only while a peer may need it.

A NIXL READ over UCX completes only when the *target* progresses too (its UCX worker answers the
endpoint wire-up and, over TCP, serves the read's data: tests/unit/test_transport_nixl.py, a read
from a parked peer process). NIXL's own progress thread spins a core, so a thread of ours polls
every ``interval_s`` instead (1 ms: the poll itself is a few µs) and **parks** on an event while
nothing can need it: polling an idle endpoint every 1 ms cost 5.6-5.9% of a core for the engine's
whole life (bench/RESULTS.md, "The idle connector").

It is awake while either holds:

- the worker says something is in flight (:meth:`set_active`): blocks held under a lease for a
  decode engine, a prefill for a remote decode being computed (its read may come before the lease
  is announced), our own pulls and peer loads;
- a **window** is open (:meth:`hold_until`, a ``time.monotonic()`` deadline): the side channel opens
  one when a peer handshakes (its first read follows) or pins DRAM-tier blocks (it reads them under
  the pin's lease, which lives in the scheduler process, not here): connectors/read_windows.py.

Waking is race-free: the thread clears its event and checks both conditions again before it sleeps,
and both setters change the condition before they set the event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ProgressThread:
    def __init__(self, poll: Callable[[], None], interval_s: float, name: str = "llmd-nixl-progress") -> None:
        self._poll = poll
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._active = True  # transports start active (base.KVTransport.set_active)
        self._until = 0.0
        #: how often it went to sleep (tests, logs)
        self.parks = 0
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name=name, daemon=True)
        self._thread.start()

    def awake(self) -> bool:
        return self._active or time.monotonic() < self._until

    def set_active(self, active: bool) -> None:
        self._active = active
        if active:
            self._wake.set()

    def hold_until(self, deadline: float) -> None:
        """Stay awake until ``deadline`` (``time.monotonic()``); an earlier deadline than the last one
        shortens the window (the caller keeps the latest of its windows: read_windows.py)."""
        self._until = deadline
        if deadline > time.monotonic():
            self._wake.set()

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            if not self.awake():
                self._wake.clear()
                if not self.awake():  # a setter that ran before the clear changed the condition
                    self.parks += 1
                    self._wake.wait()  # no wake-ups at all while parked
                continue
            if self._stop.wait(interval_s):
                return
            try:
                self._poll()
            except Exception:  # an agent being torn down; close() stops the loop
                if self._stop.is_set():
                    return

    def close(self) -> None:
        self._stop.set()
        self._wake.set()  # a parked thread sees the stop
        self._thread.join(timeout=5)
