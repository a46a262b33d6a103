"""A real MLflow tracking server on 127.0.0.1 for tests: SQLite backend, artifacts proxied to the S3 test server.

Artifacts are proxied (`--artifacts-destination s3://...`), so only the server's environment holds the S3
endpoint and keys; clients talk HTTP to the server alone. The server forks workers that outlive a SIGTERM of
the parent, so it runs in its own process group and is stopped by group. `stop()` and `restart()` keep the
port and the backend store, so a test can take the server away mid-run and bring the same one back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import S3Server, free_port, stop_process_group

READY_TIMEOUT_S = 90.0
"""Start takes ~7-12 s on 2 cores; the margin is for a loaded machine, the wait ends as soon as the API answers."""


class MlflowServer:
    """`mlflow server` over a SQLite file, its artifacts proxied to `s3://<bucket>/<prefix>` on `s3`."""

    def __init__(self, root: Path, s3: S3Server, bucket: str = "ctv2v", prefix: str = "mlflow"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_destination = f"s3://{bucket}/{prefix}"
        self.log = self.root / "mlflow-server.log"
        self.s3 = s3
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The tracking URI clients use."""
        return f"http://127.0.0.1:{self.port}"

    def _server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MLFLOW_S3_ENDPOINT_URL=self.s3.url,
            AWS_ACCESS_KEY_ID=self.s3.access_key,
            AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            # The huey job runner (GenAI evaluation jobs) forks ~7 consumers that tests never use.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        return env

    def start(self) -> None:
        """Start the server (same port and backend as before) and wait until a real API call answers."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"MLflow server on port {self.port} is already running (pid {self.proc.pid})")
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow_cli), "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self._server_env(), start_new_session=True
            )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        # /health answers before the tracking API is usable (and stays 200 when the Host check rejects clients),
        # so readiness is a real API call. The artifact listing follows because the server imports boto3 and
        # opens its S3 client on the first proxied artifact request, which alone takes longer than a 2 s client
        # timeout; after it, the server is ready for clients with short timeouts.
        urls = [
            f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1",
            f"{self.uri}/api/2.0/mlflow-artifacts/artifacts?path=",
        ]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while urls and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(urls[0], timeout=10) as response:
                    if response.status == 200:
                        urls.pop(0)
                        continue
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        if not urls:
            return
        self.stop()
        raise TimeoutError(f"mlflow server on port {self.port} not ready after {READY_TIMEOUT_S}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Stop the server's whole process group (workers included)."""
        if self.proc is not None:
            stop_process_group(self.proc)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same backend store and artifact destination."""
        self.stop()
        self.start()


def start_mlflow_server(root: Path, s3: S3Server) -> MlflowServer:
    """A started MlflowServer under `root` whose artifacts go to the `ctv2v` bucket of `s3`."""
    server = MlflowServer(root, s3)
    server.start()
    return server
