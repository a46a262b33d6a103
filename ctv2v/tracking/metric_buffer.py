"""Metrics wait in the step's journal and go to the server every `flush_interval_s` and at the end, so a step
that logs every batch makes one request per interval, and a hard crash loses at most one interval of them."""

from __future__ import annotations

import time
from collections.abc import Mapping

from ctv2v.tracking.journal import Journal, now_ms


class MetricBuffer:
    """When the buffered metrics are due to be sent; they are kept in the journal meanwhile."""

    def __init__(self, flush_interval_s: float):
        self.flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()

    @staticmethod
    def add(journal: Journal, values: Mapping[str, float], step: int) -> None:
        """Append `values` at `step`, stamped now (the caller holds the journal's lock)."""
        timestamp = now_ms()
        journal.metrics.extend([key, value, timestamp, step] for key, value in values.items())

    def due(self) -> bool:
        """True once `flush_interval_s` passed since the last flush."""
        return time.monotonic() - self._last_flush >= self.flush_interval_s

    def flushed(self) -> None:
        """A flush ran (whether or not the server answered): the interval starts again."""
        self._last_flush = time.monotonic()
