"""S3 object storage through the `minio` client: stage datasets in, push files out, all writes atomic.

The endpoint is a URL (`http://host:port` or `https://host`) from `storage.s3_endpoint` or the S3_ENDPOINT
environment variable; its scheme decides TLS. Credentials come only from AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY (a Kubernetes Secret in the cluster), never from a config file. Every failure is one
StorageError that names the s3:// URI and the endpoint. S3-compatible servers differ in how they report
errors: MinIO sends XML bodies that minio-py parses into S3Error, `rclone serve s3` sends text/xml that minio-py
raises as InvalidResponseError; both are translated here. Connection failures and 500/502/503/504 replies are
retried by ctv2v.remote.retry's policy (urllib3's own retries are off, so there is one retry mechanism): each
request times out after storage.timeout_s, a download slower than storage.min_bytes_per_s is retried like a
timeout, and no retry starts after storage.deadline_s. A 403 reply is
StorageAccessDeniedError, whose message points at the credentials rather than at reachability.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from ctv2v.config import StorageConfig
from ctv2v.files import atomic_path
from ctv2v.remote.retry import MinThroughput, RetriesExhausted, RetryPolicy, TransferTooSlowError, remote_policy

log = logging.getLogger(__name__)

ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
ENDPOINT_ENV = "S3_ENDPOINT"
_CHUNK = 1 << 20
_TRANSLATED = (MinioException, urllib3.exceptions.HTTPError, OSError, RetriesExhausted)
"""Errors turned into one StorageError: server replies, connection failures, local file errors, retries spent."""
_TRANSIENT_STATUS = (500, 502, 503, 504)
_TRANSIENT_TRANSPORT = (
    urllib3.exceptions.MaxRetryError,  # with urllib3's retries off: refused, unreachable, connect/read timeout
    urllib3.exceptions.ProtocolError,  # the connection dropped mid-reply
    urllib3.exceptions.TimeoutError,  # a read timeout while streaming a body
    TransferTooSlowError,  # a body trickling in below storage.min_bytes_per_s
)


class StorageError(RuntimeError):
    """An object-storage operation failed; the message names the s3:// URI and the endpoint."""


class StorageAccessDeniedError(StorageError):
    """The server answered 403: the credentials are wrong or lack access (the server itself is reachable)."""


CREDENTIALS_HINT = (f"the server refused access: check {ACCESS_KEY_ENV} / {SECRET_KEY_ENV} and that they may read "
                    "this bucket")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/path` -> ("bucket", "key/path"); the key may be empty (a whole bucket)."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{uri!r} is not an s3:// URI (expected s3://BUCKET/KEY)")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: an s3:// URI takes no query or fragment")
    return parts.netloc, parts.path.lstrip("/")


def _endpoint(storage: StorageConfig) -> tuple[str, str, bool]:
    """(endpoint URL, host[:port], secure) from the configured or environment endpoint URL."""
    url = storage.s3_endpoint or os.environ.get(ENDPOINT_ENV)
    if not url:
        raise StorageError(
            f"no S3 endpoint: set storage.s3_endpoint in the config or the {ENDPOINT_ENV} environment variable "
            "(a URL such as http://minio.kubeflow:9000)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageError(f"S3 endpoint {url!r} must be a URL with scheme http:// or https://")
    if parts.path not in ("", "/") or parts.query:
        raise StorageError(f"S3 endpoint {url!r} must be scheme://host[:port] with no path")
    return url, parts.netloc, parts.scheme == "https"


def _status(exc: MinioException) -> int | None:
    """The HTTP status of a server reply minio raised; rclone's text/xml replies carry it only in the message."""
    if isinstance(exc, S3Error):
        return exc.response.status
    if isinstance(exc, ServerError):
        return exc.status_code
    if isinstance(exc, InvalidResponseError):
        status = re.search(r"Response code: (\d+)", str(exc))
        return int(status.group(1)) if status else None
    return None


def _is_transient(exc: Exception) -> bool:
    """A failure worth retrying: no connection, a timeout, a dropped reply, or a 500/502/503/504 reply."""
    if isinstance(exc, _TRANSIENT_TRANSPORT):
        return True
    return isinstance(exc, MinioException) and _status(exc) in _TRANSIENT_STATUS


class _Store:
    """A minio client plus the endpoint URL that every error message names."""

    def __init__(self, storage: StorageConfig | None, retry: RetryPolicy | None):
        storage = storage or StorageConfig()
        self.retry = retry or remote_policy(storage.deadline_s)
        self.min_throughput = MinThroughput.of(storage)
        self.endpoint, host, secure = _endpoint(storage)
        missing = [name for name in (ACCESS_KEY_ENV, SECRET_KEY_ENV) if not os.environ.get(name)]
        if missing:
            raise StorageError(f"S3 credentials missing: set the {' and '.join(missing)} environment variable(s)")
        # No retries inside urllib3 (minio's default would retry for minutes): `retry` is the one policy.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=storage.timeout_s, read=storage.timeout_s),
            retries=urllib3.Retry(total=0, respect_retry_after_header=False),
        )
        self.client = Minio(
            host,
            access_key=os.environ[ACCESS_KEY_ENV],
            secret_key=os.environ[SECRET_KEY_ENV],
            secure=secure,
            region=storage.s3_region,
            http_client=http,
        )

    def error(self, action: str, exc: Exception) -> StorageError:
        """One StorageError naming what failed, the endpoint and the server's reason."""
        if isinstance(exc, RetriesExhausted):
            cause = self.error(action, exc.last)
            return StorageError(f"{cause}; gave up after {exc.attempts} attempts in {exc.elapsed_s:.1f} s")
        if isinstance(exc, S3Error):
            reason = f"{exc.code}: {exc.message}"
        elif isinstance(exc, InvalidResponseError):
            # rclone's text/xml error bodies land here unparsed: pull the status and the S3 error code out.
            text = str(exc)
            status = _status(exc)
            code = re.search(r"<Code>(.*?)</Code>", text, re.S)
            message = re.search(r"<Message>(.*?)</Message>", text, re.S)
            reason = ": ".join(
                part for part in (
                    f"HTTP {status}" if status is not None else "invalid response",
                    code.group(1) if code else None,
                    message.group(1).strip() if message else None,
                ) if part
            )
        elif isinstance(exc, urllib3.exceptions.MaxRetryError):
            reason = f"cannot connect: {exc.reason}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MinioException) and _status(exc) == 403:
            return StorageAccessDeniedError(f"{action} failed (endpoint {self.endpoint}): {reason}; {CREDENTIALS_HINT}")
        return StorageError(f"{action} failed (endpoint {self.endpoint}): {reason}")

    def get(self, uri: str, dest: Path) -> Path:
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names a prefix, not an object: use download_prefix")

        def attempt() -> None:
            response = self.client.get_object(bucket, key)
            try:
                with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    for block in self.min_throughput.blocks(response.read1, _CHUNK):
                        out.write(block)
            finally:
                response.close()
                response.release_conn()

        try:
            self.retry.call(f"download of {uri}", attempt, _is_transient)
        except _TRANSLATED as exc:
            raise self.error(f"download of {uri}", exc) from exc
        log.info("downloaded %s -> %s (%d bytes)", uri, dest, dest.stat().st_size)
        return dest

    def put(self, path: Path, uri: str) -> str:
        bucket, key = parse_s3_uri(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"{uri!r} names a prefix, not an object key")
        try:
            self.retry.call(f"upload of {path} to {uri}", lambda: self.client.fput_object(bucket, key, str(path)),
                            _is_transient)
        except _TRANSLATED as exc:
            raise self.error(f"upload of {path} to {uri}", exc) from exc
        log.info("uploaded %s -> %s (%d bytes)", path, uri, path.stat().st_size)
        return uri


def download(uri: str, dest: Path, *, storage: StorageConfig | None = None,
             retry: RetryPolicy | None = None) -> Path:
    """Download one object to `dest` atomically (the file appears only once complete)."""
    return _Store(storage, retry).get(uri, Path(dest))


def upload(path: Path, uri: str, *, storage: StorageConfig | None = None, retry: RetryPolicy | None = None) -> str:
    """Upload one file to `uri`; returns the URI."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to upload to {uri}")
    return _Store(storage, retry).put(path, uri)


def _prefix(key: str) -> str:
    """A key prefix that matches whole folder names only (`data` must not match `data2/...`)."""
    return key if not key or key.endswith("/") else key + "/"


def download_prefix(uri_prefix: str, dest_dir: Path, *, storage: StorageConfig | None = None,
                    retry: RetryPolicy | None = None) -> list[Path]:
    """Stage every object under `uri_prefix` into `dest_dir`, keeping relative paths; returns the files."""
    bucket, key = parse_s3_uri(uri_prefix)
    prefix = _prefix(key)
    store = _Store(storage, retry)
    dest_dir = Path(dest_dir)
    try:
        names = store.retry.call(
            f"listing of {uri_prefix}",
            lambda: [obj.object_name for obj in store.client.list_objects(bucket, prefix=prefix, recursive=True)],
            _is_transient,
        )
    except _TRANSLATED as exc:
        raise store.error(f"listing of {uri_prefix}", exc) from exc
    names = [name for name in names if not name.endswith("/")]
    if not names:
        raise StorageError(f"no objects under {uri_prefix} (endpoint {store.endpoint})")
    files = []
    for name in names:
        relative = PurePosixPath(name[len(prefix):])
        if relative.is_absolute() or ".." in relative.parts:
            raise StorageError(f"object s3://{bucket}/{name} would be written outside {dest_dir}")
        files.append(store.get(f"s3://{bucket}/{name}", dest_dir.joinpath(*relative.parts)))
    return files

