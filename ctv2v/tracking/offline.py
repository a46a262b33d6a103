"""When the tracking server counts as away (which errors mean no answer) and the gate that keeps calls off the
network while it is: after one unanswered call none for `retry_interval_s`, doubling up to 16x while it stays
away (a RetryGate, ctv2v.remote.retry), so training pays at most one stall per interval."""

from __future__ import annotations

import logging

import requests
from mlflow.exceptions import MlflowException

from ctv2v.remote.retry import Backoff, RetryGate

log = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 16

REMOTE_ERRORS = (MlflowException, requests.RequestException, ConnectionError, TimeoutError)
"""What a call to the tracking server raises: a rejection (MlflowException) or no answer."""
_TRANSPORT_ERRORS = (requests.RequestException, ConnectionError, TimeoutError)


def is_server_unreachable(exc: BaseException) -> bool:
    """True when `exc` or an exception it was raised from is a network failure (refused, timeout, retries spent).

    Retries end in requests' RetryError for the statuses MLflow retries (408, 429, 500, 502-504), so those count.

    MLflow wraps transport errors in MlflowException, keeping the original as the exception's cause or context.
    """
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, _TRANSPORT_ERRORS):
            return True
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return False


class OfflineGate:
    """Whether to call the tracking server now; says once (WARNING) that it went away, then at INFO."""

    def __init__(self, tracking_uri: str | None, retry_interval_s: float, kept_in: str):
        """`kept_in` says where tracking data waits meanwhile (the pending journals' path pattern)."""
        self.tracking_uri = tracking_uri
        self.kept_in = kept_in
        self._gate = RetryGate(Backoff(first_s=retry_interval_s, max_s=retry_interval_s * MAX_BACKOFF_FACTOR))

    def is_open(self) -> bool:
        """True unless an unanswered call is more recent than the current back-off."""
        return self._gate.is_open()

    def went_away(self, exc: BaseException) -> None:
        """A call was not answered (`exc`): keep calls off the network for the next back-off."""
        wait_s = self._gate.failed()
        if self._gate.failures == 1:
            log.warning(
                "MLflow server %s is unreachable (%s). Training continues; tracking data is kept in %s "
                "and uploaded when the server answers (next try in %.0f s, and at the end of the step)",
                self.tracking_uri, exc, self.kept_in, wait_s,
            )
        else:
            log.info("MLflow server %s still unreachable (%s); next try in %.0f s", self.tracking_uri, exc, wait_s)

    def answered(self) -> None:
        """A sync went through: the gate opens and the back-off starts again from its first interval."""
        if self._gate.failures:
            log.info("MLflow server %s answers again; pending tracking data uploaded", self.tracking_uri)
        self._gate.succeeded()
