"""The one retry policy for remote calls (S3 storage, checkpoint downloads, the MLflow tracking server).

A failed call is retried only when the failure is transient (the caller says which are), after a delay that
doubles from `Backoff.first_s` up to `Backoff.max_s`. Time is bounded twice: at most `attempts` attempts, and no
retry starts once it would begin after `deadline_s` from the first attempt; each attempt is bounded by its
own I/O timeouts and, for a transfer, by a minimum throughput (`MinThroughput`: a server that trickles bytes
never trips a read timeout). Every retry is logged with what failed and how long the wait is.

Callers that must never wait on a remote (a training step tracking to MLflow) use a `RetryGate` with the same
back-off instead: after a failure the gate stays shut for the back-off delay, and the caller skips the remote
until it opens again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ctv2v.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetriesExhausted(RuntimeError):
    """Every attempt failed, or the deadline left no time for another; the last failure is the `__cause__`."""

    def __init__(self, attempts: int, elapsed_s: float, last: BaseException):
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last = last
        super().__init__(f"gave up after {attempts} attempts in {elapsed_s:.1f} s: {last}")


@dataclass(frozen=True)
class Backoff:
    """Exponential delays: `first_s` after the first failure, doubling after each further one, at most `max_s`."""

    first_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.first_s < 0 or self.max_s < self.first_s:
            raise ValueError(f"Backoff(first_s={self.first_s}, max_s={self.max_s}): need 0 <= first_s <= max_s")

    def delay_s(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1, 2, 3, ... -> first_s, 2*first_s, 4*first_s, ...)."""
        return min(self.first_s * 2 ** (failures - 1), self.max_s)


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` attempts, `backoff` between them, no retry started after `deadline_s`."""

    attempts: int = 4
    backoff: Backoff = field(default_factory=lambda: Backoff(first_s=1.0, max_s=30.0))
    deadline_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.deadline_s <= 0:
            raise ValueError(f"RetryPolicy(attempts={self.attempts}, deadline_s={self.deadline_s}): need "
                             "attempts >= 1 and deadline_s > 0")

    def call(self, what: str, operation: Callable[[], T], transient: Callable[[Exception], bool]) -> T:
        """`operation()`, retried while it raises an exception for which `transient(exc)` is true.

        A non-transient failure propagates at once; running out of attempts or time raises RetriesExhausted.
        """
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return operation()
            except Exception as exc:
                if not transient(exc):
                    raise
                failures += 1
                elapsed_s = time.monotonic() - started
                delay_s = self.backoff.delay_s(failures)
                if failures >= self.attempts or elapsed_s + delay_s > self.deadline_s:
                    log.warning("%s: attempt %d of %d failed (%s); giving up after %.1f s",
                                what, failures, self.attempts, exc, elapsed_s)
                    raise RetriesExhausted(failures, elapsed_s, exc) from exc
                log.warning("%s: attempt %d of %d failed (%s); retrying in %.1f s",
                            what, failures, self.attempts, exc, delay_s)
                time.sleep(delay_s)


def remote_policy(deadline_s: float) -> RetryPolicy:
    """Storage and checkpoint downloads: 4 attempts, 1 s / 2 s / 4 s apart, no retry started after `deadline_s`."""
    return RetryPolicy(deadline_s=deadline_s)


class TransferTooSlowError(TimeoutError):
    """A transfer brought fewer bytes than its minimum throughput over a window (retried like a timeout)."""


@dataclass(frozen=True)
class MinThroughput:
    """At least `bytes_per_s`, averaged over each `window_s` of a transfer (storage.min_bytes_per_s over
    storage.timeout_s)."""

    bytes_per_s: float
    window_s: float

    @classmethod
    def of(cls, storage: StorageConfig) -> MinThroughput:
        """The configured minimum: storage.min_bytes_per_s, measured over storage.timeout_s windows."""
        return cls(storage.min_bytes_per_s, storage.timeout_s)

    def blocks(self, read1: Callable[[int], bytes], chunk: int) -> Iterator[bytes]:
        """A response body as it arrives, through `read1(chunk)` (at most `chunk` bytes, returning as soon as any
        came: a full-buffer read of a trickle would never return), until b""; TransferTooSlowError once a window
        brought too few bytes."""
        window_start, window_bytes = time.monotonic(), 0
        for block in iter(lambda: read1(chunk), b""):
            yield block
            window_bytes += len(block)
            elapsed_s = time.monotonic() - window_start
            if elapsed_s >= self.window_s:
                if window_bytes < self.bytes_per_s * elapsed_s:
                    raise TransferTooSlowError(
                        f"transfer too slow: {window_bytes} bytes in {elapsed_s:.1f} s, below storage.min_bytes_per_s "
                        f"= {self.bytes_per_s:g} B/s (measured over storage.timeout_s = {self.window_s:g} s windows)")
                window_start, window_bytes = time.monotonic(), 0


class RetryGate:
    """The back-off for callers that must not wait: shut for `backoff.delay_s(failures)` after each failure."""

    def __init__(self, backoff: Backoff):
        self.backoff = backoff
        self.failures = 0
        """Consecutive failures since the last success."""
        self._shut_until = 0.0

    def is_open(self) -> bool:
        """The back-off delay since the last failure has passed (always true before any failure)."""
        return time.monotonic() >= self._shut_until

    def failed(self) -> float:
        """Record a failure; returns how long the gate now stays shut (seconds)."""
        self.failures += 1
        wait_s = self.backoff.delay_s(self.failures)
        self._shut_until = time.monotonic() + wait_s
        return wait_s

    def succeeded(self) -> None:
        """Record a success: the gate opens and the next failure starts the back-off from `first_s` again."""
        self.failures = 0
        self._shut_until = 0.0
