"""The tracking server's address and the MLflow client's HTTP settings; a local store is never created by a lookup."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ctv2v.config import TrackingConfig

log = logging.getLogger(__name__)


def configure_client_http(config: TrackingConfig) -> None:
    """Set MLflow's HTTP timeout and retry count (process-wide environment) from the tracking config."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(math.ceil(config.request_timeout_s)),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(config.max_retries),
    }
    for name, value in settings.items():
        previous = os.environ.get(name)
        if previous is not None and previous != value:
            log.info("%s=%s from the environment is replaced by %s from the tracking config", name, previous, value)
        os.environ[name] = value


def tracking_uri(config: TrackingConfig) -> str | None:
    """The tracking URI: tracking.tracking_uri, else MLFLOW_TRACKING_URI; None means tracking is off."""
    return config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class TrackingStoreError(ValueError):
    """A tracking URI names a local store (an SQLite file, an mlruns folder) that does not exist."""


def existing_store(uri: str) -> str:
    """`uri` when it names a server, or a local store that exists; TrackingStoreError otherwise.

    MLflow creates an empty local store (e.g. ./mlflow.db) on first use of a URI that names none; a lookup or an
    upload must never leave one behind.
    """
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:///relative.db or sqlite:////absolute.db
        exists, kind = path.is_file(), "SQLite file"
    elif parts.scheme in ("file", ""):
        path = Path(unquote(parts.path) if parts.scheme == "file" else uri)
        exists, kind = path.is_dir(), "folder"
    else:
        return uri
    if not exists:
        raise TrackingStoreError(f"tracking URI {uri}: no such {kind} {path}; ctv2v never creates a tracking store as "
                                 "a side effect: give a server URL or an existing store")
    return uri
