"""Log lines about bad input that a flood of bad input cannot multiply.

Each :class:`LogLimiter` lets ``burst`` lines through per ``interval_s`` and counts the rest; the
next line that gets through says how many were held back. Used wherever a peer or a client decides
how often we log (misframed ZMQ messages, malformed ``kv_transfer_params``): without it, 20,000
misframed handshake messages wrote 2 MB of warnings (issue 9).

Imports nothing of ``vllm_llmd``.
"""

from __future__ import annotations

import logging
import threading
import time


class LogLimiter:
    def __init__(self, logger: logging.Logger, burst: int = 10, interval_s: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._window_start = -float("inf")
        self._in_window = 0
        self.suppressed = 0  # held back since the last line that got through
        self.suppressed_total = 0

    def _admit(self) -> int | None:
        """``None`` to hold this line back, else how many were held back before it."""
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= self.interval_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self.burst:
                self.suppressed += 1
                self.suppressed_total += 1
                return None
            self._in_window += 1
            held, self.suppressed = self.suppressed, 0
            return held

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` unless the budget is spent; whether it was logged."""
        held = self._admit()
        if held is None:
            return False
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, msg, *args)
