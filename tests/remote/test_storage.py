"""ctv2v.remote.storage against a real S3-compatible server (`rclone serve s3` on 127.0.0.1)."""

from __future__ import annotations

import pytest

from ctv2v.config import StorageConfig
from ctv2v.remote.retry import Backoff, RetryPolicy
from ctv2v.remote.storage import (
    StorageError,
    download,
    download_prefix,
    parse_s3_uri,
    upload,
)
from tests.servers import free_port


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def test_parse_s3_uri():
    assert parse_s3_uri("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        parse_s3_uri("https://bucket/a")


def test_upload_then_download_round_trip(s3_env, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    upload(src, "s3://ctv2v/roundtrip/weights.bin")
    assert (s3_env.root / "ctv2v" / "roundtrip" / "weights.bin").read_bytes() == src.read_bytes()

    dest = tmp_path / "out" / "weights.bin"
    download("s3://ctv2v/roundtrip/weights.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["weights.bin"]


def test_download_prefix_keeps_relative_paths(s3_env, tmp_path):
    # Objects go in through the API: rclone caches folder listings, so files written to its disk may not show.
    objects = {"demo/patient-1/ct.nii.gz": b"one", "demo/patient-2/series/0001.dcm": b"two",
               "demo2/other.bin": b"a sibling prefix that starts with the same letters must not be staged"}
    for key, data in objects.items():
        src = tmp_path / "src" / key
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        upload(src, f"s3://ctv2v/datasets/{key}")

    staged = tmp_path / "staged"
    files = download_prefix("s3://ctv2v/datasets/demo", staged)
    assert sorted(p.relative_to(staged).as_posix() for p in files) == [
        "patient-1/ct.nii.gz", "patient-2/series/0001.dcm"]
    assert (staged / "patient-2" / "series" / "0001.dcm").read_bytes() == b"two"


def test_missing_object_is_one_clear_error_and_leaves_no_file(s3_env, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(StorageError,
                       match=r"download of s3://ctv2v/no/such/key.bin failed \(endpoint http://127.*NoSuchKey"):
        download("s3://ctv2v/no/such/key.bin", dest)
    assert list(tmp_path.iterdir()) == []


def test_empty_prefix_is_an_error(s3_env, tmp_path):
    with pytest.raises(StorageError, match="no objects under s3://ctv2v/nothing-here"):
        download_prefix("s3://ctv2v/nothing-here", tmp_path)


def test_wrong_secret_is_reported(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    with pytest.raises(StorageError, match="upload of .*f.bin to s3://ctv2v/f.bin failed .*SignatureDoesNotMatch"):
        upload(src, "s3://ctv2v/f.bin")


def test_missing_credentials_name_the_variable(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="set the AWS_SECRET_ACCESS_KEY environment variable"):
        download("s3://ctv2v/a.bin", tmp_path / "a.bin")


def test_missing_endpoint_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    with pytest.raises(StorageError, match="S3_ENDPOINT"):
        download("s3://ctv2v/a.bin", tmp_path / "a.bin", storage=StorageConfig())


def test_endpoint_needs_a_scheme(s3_env, tmp_path):
    with pytest.raises(StorageError, match="scheme http:// or https://"):
        download("s3://ctv2v/a.bin", tmp_path / "a.bin", storage=StorageConfig(s3_endpoint=s3_env.endpoint))


def test_unreachable_endpoint_is_retried_then_one_error(s3_env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    retry = RetryPolicy(attempts=3, backoff=Backoff(first_s=0.01, max_s=0.01), deadline_s=60)
    with pytest.raises(StorageError, match=r"download of s3://ctv2v/a.bin failed .*cannot connect.*gave up after 3"):
        download("s3://ctv2v/a.bin", tmp_path / "a.bin", retry=retry)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and all("download of s3://ctv2v/a.bin" in message for message in retries)
    assert list(tmp_path.iterdir()) == []


def test_config_endpoint_wins_over_environment(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    upload(src, "s3://ctv2v/config-endpoint/f.bin", storage=StorageConfig(s3_endpoint=s3_env.url))
    assert (s3_env.root / "ctv2v" / "config-endpoint" / "f.bin").read_bytes() == b"data"
