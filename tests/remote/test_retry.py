"""ctv2v.remote.retry: the one retry policy (attempts, back-off, deadline) and the non-blocking gate."""

from __future__ import annotations

import logging
import time

import pytest

from ctv2v.remote.retry import Backoff, RetriesExhausted, RetryGate, RetryPolicy


class Flaky:
    """An operation that raises `errors` in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def transient(exc: Exception) -> bool:
    return isinstance(exc, ConnectionError)


def test_transient_failures_are_retried_and_each_retry_is_logged(caplog):
    operation = Flaky(ConnectionError("refused"), ConnectionError("reset"))
    policy = RetryPolicy(attempts=3, backoff=Backoff(first_s=0.01, max_s=0.01), deadline_s=60)
    with caplog.at_level(logging.WARNING, logger="ctv2v.remote.retry"):
        assert policy.call("upload of a.bin", operation, transient) == "done"
    assert operation.calls == 3
    assert [r.getMessage() for r in caplog.records] == [
        "upload of a.bin: attempt 1 of 3 failed (refused); retrying in 0.0 s",
        "upload of a.bin: attempt 2 of 3 failed (reset); retrying in 0.0 s",
    ]


def test_other_failures_are_not_retried():
    operation = Flaky(PermissionError("403"))
    with pytest.raises(PermissionError):
        RetryPolicy(attempts=5).call("upload", operation, transient)
    assert operation.calls == 1


def test_attempts_are_bounded_and_the_last_failure_is_the_cause():
    operation = Flaky(*[ConnectionError(f"refused {i}") for i in range(10)])
    policy = RetryPolicy(attempts=3, backoff=Backoff(first_s=0.01, max_s=0.01), deadline_s=60)
    with pytest.raises(RetriesExhausted, match=r"gave up after 3 attempts in .* s: refused 2") as info:
        policy.call("download", operation, transient)
    assert operation.calls == 3
    assert str(info.value.__cause__) == "refused 2" and info.value.last is info.value.__cause__


def test_no_retry_starts_after_the_deadline():
    operation = Flaky(*[ConnectionError("refused") for _ in range(50)])
    # 0.2 s apart with a 0.5 s deadline: attempts at 0, 0.2 and 0.4 s; a fourth would start after 0.5 s.
    policy = RetryPolicy(attempts=50, backoff=Backoff(first_s=0.2, max_s=0.2), deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(RetriesExhausted):
        policy.call("download", operation, transient)
    assert 2 <= operation.calls <= 3
    assert time.monotonic() - started <= 0.5


def test_backoff_doubles_up_to_its_cap():
    backoff = Backoff(first_s=60, max_s=960)
    assert [backoff.delay_s(failures) for failures in range(1, 8)] == [60, 120, 240, 480, 960, 960, 960]
    with pytest.raises(ValueError, match="first_s <= max_s"):
        Backoff(first_s=2, max_s=1)


def test_gate_stays_shut_for_the_backoff_then_opens_and_resets_on_success():
    gate = RetryGate(Backoff(first_s=0.2, max_s=0.4))
    assert gate.is_open()
    assert gate.failed() == 0.2 and not gate.is_open()
    assert gate.failed() == 0.4 and gate.failed() == 0.4 and gate.failures == 3
    time.sleep(0.45)
    assert gate.is_open()
    gate.succeeded()
    assert gate.failures == 0 and gate.is_open() and gate.failed() == 0.2
