"""ctv2v.remote.storage against a real S3-compatible server (`rclone serve s3` on 127.0.0.1)."""

from __future__ import annotations

import pytest

from ctv2v.config import StorageConfig
from ctv2v.remote.storage import (
    StorageError,
    download,
    download_prefix,
    parse_s3_uri,
    s3_client,
    upload,
    upload_dir,
)


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


def test_upload_dir_and_download_prefix_keep_relative_paths(s3_env, tmp_path):
    src = tmp_path / "dataset"
    (src / "patient-1").mkdir(parents=True)
    (src / "patient-1" / "ct.nii.gz").write_bytes(b"one")
    (src / "patient-2" / "series").mkdir(parents=True)
    (src / "patient-2" / "series" / "0001.dcm").write_bytes(b"two")
    uris = upload_dir(src, "s3://ctv2v/datasets/demo")
    assert sorted(uris) == ["s3://ctv2v/datasets/demo/patient-1/ct.nii.gz",
                            "s3://ctv2v/datasets/demo/patient-2/series/0001.dcm"]
    # A sibling prefix that starts with the same letters must not be staged.
    (s3_env.root / "ctv2v" / "datasets" / "demo2").mkdir(parents=True)
    (s3_env.root / "ctv2v" / "datasets" / "demo2" / "other.bin").write_bytes(b"x")

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


def test_missing_credentials_name_the_variable(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="set the AWS_SECRET_ACCESS_KEY environment variable"):
        s3_client()


def test_missing_endpoint_names_the_variable(monkeypatch):
    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    with pytest.raises(StorageError, match="S3_ENDPOINT"):
        s3_client(StorageConfig())


def test_endpoint_needs_a_scheme(s3_env):
    with pytest.raises(StorageError, match="scheme http:// or https://"):
        s3_client(StorageConfig(s3_endpoint=s3_env.endpoint))


def test_config_endpoint_wins_over_environment(s3_env, monkeypatch, tmp_path):
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    upload(src, "s3://ctv2v/config-endpoint/f.bin", storage=StorageConfig(s3_endpoint=s3_env.url))
    assert (s3_env.root / "ctv2v" / "config-endpoint" / "f.bin").read_bytes() == b"data"
