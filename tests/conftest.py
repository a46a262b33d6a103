from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import start_s3_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (`rclone serve s3`) on 127.0.0.1 with a `ctv2v` bucket."""
    root = tmp_path_factory.mktemp("s3")
    server = start_s3_server(root / "data", root / "rclone.log")
    server.make_bucket("ctv2v")
    yield server
    server.stop()
