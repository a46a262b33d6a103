from __future__ import annotations

from pathlib import Path

import pytest

from tests.mlflow_server import start_mlflow_server
from tests.servers import start_s3_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The real demo CT dataset folder (downloaded once per machine into ~/.cache/ctv2v, then hash-checked)."""
    from ctv2v.data.demo import fetch_demo

    return fetch_demo()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (`rclone serve s3`) on 127.0.0.1 with a `ctv2v` bucket."""
    root = tmp_path_factory.mktemp("s3")
    server = start_s3_server(root / "data", root / "rclone.log")
    server.make_bucket("ctv2v")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real MLflow tracking server (SQLite backend, artifacts proxied to `s3://ctv2v/mlflow` on s3_server)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()
