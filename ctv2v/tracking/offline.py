"""When the tracking server counts as away: which errors a call to it raises, and which of them mean no answer."""

from __future__ import annotations

import requests
from mlflow.exceptions import MlflowException

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
