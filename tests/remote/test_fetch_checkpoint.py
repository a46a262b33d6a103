"""Fetching checkpoints over real servers on 127.0.0.1 (HTTP with Range resume, S3 via rclone), hashes, cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ctv2v.remote.fetch import (RECORD_NAME, HashMismatchError, SourceUnreachableError, checkpoint_file,
                               fetch_checkpoint, is_immutable, mirror, parse_source, read_record)
from ctv2v.config import RunConfig, StorageConfig
from ctv2v.config_io import load_config
from ctv2v.remote.retry import Backoff, RetryPolicy
from ctv2v.models.maisi import MAISI_CT_ARCH, load_maisi_checkpoint
from ctv2v.steps.fetch_checkpoint import STAND_IN_FILE, fetch_checkpoint_step
from tests.servers import free_port

PAYLOAD = bytes(range(256)) * 2048 + b"tail"
"""512 KiB + 4 bytes: large enough that a connection dropped at half leaves a real partial file."""
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


def quick_retry(attempts: int = 4) -> RetryPolicy:
    """The default number of attempts, without the default's seconds of back-off."""
    return RetryPolicy(attempts=attempts, backoff=Backoff(first_s=0.01, max_s=0.04), deadline_s=60)


@dataclass
class FileServer:
    """Serves PAYLOAD; /drop-once/ cuts the first response at half, /drop-always/ cuts every one, else 404."""

    port: int
    requests: list[dict] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(server: FileServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            server.requests.append({"path": self.path, "range": self.headers.get("Range")})
            if not self.path.startswith(("/ok/", "/drop-once/", "/drop-always/")):
                self.send_error(404)
                return
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
            else:
                self.send_response(200)
            body = PAYLOAD[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            first = len([r for r in server.requests if r["path"] == self.path]) == 1
            drop = self.path.startswith("/drop-always/") or (self.path.startswith("/drop-once/") and first)
            if drop:
                # Half the promised body, then the connection goes away.
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def file_server():
    server = FileServer(free_port())
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", server.port), _handler(server))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_interrupted_http_download_resumes_with_range(file_server, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    record = fetch_checkpoint(file_server.url("/drop-once/autoencoder.pt"), out, sha256=SHA256, cache_dir=cache,
                              retry=quick_retry())
    assert (out / "autoencoder.pt").read_bytes() == PAYLOAD
    assert record.sha256 == SHA256 and record.md5 == MD5 and record.size == len(PAYLOAD)
    ranges = [r["range"] for r in file_server.requests]
    assert ranges[0] is None
    assert ranges[1] == f"bytes={len(PAYLOAD) // 2}-"
    assert len(ranges) == 2
    saved = json.loads((out / RECORD_NAME).read_text())
    assert saved["source"] == file_server.url("/drop-once/autoencoder.pt") and saved["sha256"] == SHA256
    assert saved["from_cache"] is False


def test_rerun_with_same_hash_is_served_from_cache(file_server, tmp_path):
    cache = tmp_path / "cache"
    fetch_checkpoint(file_server.url("/ok/a.pt"), tmp_path / "one", md5=MD5, cache_dir=cache)
    assert len(file_server.requests) == 1
    again = fetch_checkpoint(file_server.url("/ok/a.pt"), tmp_path / "two", md5=MD5, cache_dir=cache)
    by_sha = fetch_checkpoint(file_server.url("/ok/a.pt"), tmp_path / "three", sha256=SHA256, cache_dir=cache)
    assert len(file_server.requests) == 1
    assert again.from_cache and by_sha.from_cache
    assert again.sha256 == SHA256  # md5 was expected, sha256 is still computed and recorded
    assert (tmp_path / "three" / "a.pt").read_bytes() == PAYLOAD


def test_corrupted_cache_entry_is_fetched_again(file_server, tmp_path):
    cache = tmp_path / "cache"
    fetch_checkpoint(file_server.url("/ok/a.pt"), tmp_path / "one", sha256=SHA256, cache_dir=cache)
    (cache / "sha256" / SHA256).write_bytes(b"bit rot")
    record = fetch_checkpoint(file_server.url("/ok/a.pt"), tmp_path / "two", sha256=SHA256, cache_dir=cache)
    assert not record.from_cache and len(file_server.requests) == 2
    assert (cache / "sha256" / SHA256).read_bytes() == PAYLOAD


def test_wrong_sha256_leaves_no_file(file_server, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(HashMismatchError, match=f"sha256 mismatch: expected {'0' * 64}, received {SHA256}"):
        fetch_checkpoint(file_server.url("/ok/a.pt"), out, sha256="0" * 64, cache_dir=cache)
    assert files_under(out) == [] and files_under(cache) == []


def test_connection_dropped_every_time_gives_up_and_leaves_no_file(file_server, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(SourceUnreachableError, match="gave up after 3 attempts"):
        fetch_checkpoint(file_server.url("/drop-always/a.pt"), out, sha256=SHA256, cache_dir=cache,
                         retry=quick_retry(attempts=3))
    assert len(file_server.requests) == 3
    assert files_under(out) == [] and files_under(cache) == []


def test_not_found_fails_at_once_and_points_to_mirror(file_server, tmp_path):
    source = file_server.url("/missing/a.pt")
    with pytest.raises(SourceUnreachableError) as info:
        fetch_checkpoint(source, tmp_path / "out", sha256=SHA256, cache_dir=tmp_path / "cache", retry=quick_retry())
    message = str(info.value)
    assert source in message and "HTTP 404" in message and "ctv2v checkpoint mirror FILE s3://" in message
    assert len(file_server.requests) == 1


def test_unreachable_host_names_source_and_mirror(tmp_path):
    source = f"http://127.0.0.1:{free_port()}/a.pt"
    with pytest.raises(SourceUnreachableError, match=rf"cannot fetch {source}: .*ctv2v checkpoint mirror"):
        fetch_checkpoint(source, tmp_path / "out", sha256=SHA256, cache_dir=tmp_path / "cache",
                         retry=quick_retry(attempts=2))
    assert files_under(tmp_path) == []


def test_a_hash_is_required_unless_pinned_to_a_commit(tmp_path):
    with pytest.raises(ValueError, match="an expected sha256 or md5 is required"):
        fetch_checkpoint("https://example.org/a.pt", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="an expected sha256 or md5 is required"):
        fetch_checkpoint("hf://MONAI/maisi_ct_generative/models/autoencoder.pt@main", tmp_path, cache_dir=tmp_path)
    assert not is_immutable("hf://MONAI/maisi_ct_generative/models/autoencoder.pt@main")
    assert is_immutable("hf://MONAI/maisi_ct_generative/models/autoencoder.pt@" + "a1" * 20)
    with pytest.raises(ValueError, match="not 64 hex digits"):
        fetch_checkpoint("https://example.org/a.pt", tmp_path, sha256="xyz", cache_dir=tmp_path)


def test_parse_sources():
    hf = parse_source("hf://MONAI/maisi_ct_generative/models/autoencoder.pt@0123abc")
    assert (hf.scheme, hf.location, hf.filename, hf.revision) == (
        "hf", "MONAI/maisi_ct_generative", "models/autoencoder.pt", "0123abc")
    with pytest.raises(ValueError, match="pin a revision"):
        parse_source("hf://MONAI/maisi_ct_generative/models/autoencoder.pt")
    with pytest.raises(ValueError, match="unsupported checkpoint source"):
        parse_source("ftp://host/a.pt")
    assert parse_source("file:///data/ckpt.pt").location == "/data/ckpt.pt"


def test_file_source(tmp_path):
    src = tmp_path / "local.pt"
    src.write_bytes(PAYLOAD)
    record = fetch_checkpoint(src.as_uri(), tmp_path / "out", sha256=SHA256, cache_dir=tmp_path / "cache")
    assert (tmp_path / "out" / "local.pt").read_bytes() == PAYLOAD and record.file == "local.pt"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def test_mirror_then_fetch_from_s3(s3_env, tmp_path):
    src = tmp_path / "autoencoder.pt"
    src.write_bytes(PAYLOAD)
    assert mirror(src, "s3://ctv2v/checkpoints/autoencoder.pt") == SHA256
    record = fetch_checkpoint("s3://ctv2v/checkpoints/autoencoder.pt", tmp_path / "out", sha256=SHA256,
                              cache_dir=tmp_path / "cache", storage=StorageConfig())
    assert (tmp_path / "out" / "autoencoder.pt").read_bytes() == PAYLOAD and record.md5 == MD5


def test_missing_s3_object_is_unreachable_with_hint(s3_env, tmp_path):
    with pytest.raises(SourceUnreachableError, match="s3://ctv2v/nope.pt.*NoSuchKey.*ctv2v checkpoint mirror"):
        fetch_checkpoint("s3://ctv2v/nope.pt", tmp_path / "out", sha256=SHA256, cache_dir=tmp_path / "cache")
    assert files_under(tmp_path) == []


# ------------------------------------------------------------------------------------------ the step
def test_stand_in_step_builds_maisi_layout_and_says_stand_in(tmp_path):
    config = RunConfig.model_validate({"variant": "pretrained", "vae": {"maisi": {"weights": "stand-in"}}})
    fetched = fetch_checkpoint_step(config, tmp_path / "out")
    assert fetched.record.weights == "stand-in" and "stand-in" in fetched.record.source
    assert fetched.record.file == STAND_IN_FILE and fetched.path == tmp_path / "out" / STAND_IN_FILE
    assert read_record(tmp_path / "out") == fetched.record
    _, report = load_maisi_checkpoint(checkpoint_file(tmp_path / "out"))
    assert report.complete and report.arch == MAISI_CT_ARCH
    assert (tmp_path / "out" / "resolved-config.yaml").is_file()


def test_pretrained_step_with_unreachable_source_names_stand_in_in_one_line(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CTV2V_CACHE", str(tmp_path / "cache"))
    config = load_config([], [f"vae.maisi.checkpoint={file_server.url('/missing/a.pt')}", f"vae.maisi.md5={MD5}"])
    with pytest.raises(SourceUnreachableError) as info:
        fetch_checkpoint_step(config, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert "ctv2v checkpoint mirror" in message and "--set vae.maisi.weights=stand-in" in message
    assert files_under(tmp_path) == []


def test_cli_fetch_with_source_shorthand_and_config_rerun(file_server, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("CTV2V_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["fetch-checkpoint", "--source", file_server.url("/ok/autoencoder.pt"), "--md5", MD5,
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sha256"] == SHA256 and printed["path"] == str(out / "autoencoder.pt")
    # The rerun: the same command line the pipeline runs, from the resolved config the output carries.
    rerun = tmp_path / "rerun"
    assert main(["fetch-checkpoint", "--config", str(out / "resolved-config.yaml"), "--out", str(rerun)]) == 0
    assert json.loads(capsys.readouterr().out)["from_cache"] is True
    assert (rerun / "autoencoder.pt").read_bytes() == PAYLOAD


def test_cli_fetch_failure_is_one_error_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("CTV2V_CACHE", str(tmp_path / "cache"))
    assert main(["fetch-checkpoint", "--source", "https://example.org/a.pt", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an expected sha256 or md5 is required" in err


def test_cli_mirror_prints_sha256_for_the_config(s3_env, tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "autoencoder.pt"
    src.write_bytes(PAYLOAD)
    assert main(["checkpoint", "mirror", str(src), "s3://ctv2v/mirrored/autoencoder.pt"]) == 0
    printed = capsys.readouterr().out
    assert f"sha256: {SHA256}" in printed and "checkpoint: s3://ctv2v/mirrored/autoencoder.pt" in printed
    assert (s3_env.root / "ctv2v" / "mirrored" / "autoencoder.pt").read_bytes() == PAYLOAD


def test_fetched_and_cached_files_follow_the_umask(tmp_path):
    """Not mkstemp's 0600: another user's step must be able to read the fetched checkpoint and the shared cache."""
    source = tmp_path / "vae.pt"
    source.write_bytes(PAYLOAD)
    previous = os.umask(0o002)
    try:
        fetch_checkpoint(source.as_uri(), tmp_path / "out", sha256=SHA256, cache_dir=tmp_path / "cache")
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "vae.pt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "out" / RECORD_NAME).stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "cache" / "sha256" / SHA256).stat().st_mode & 0o777 == 0o664
