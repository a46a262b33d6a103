"""Fetch a checkpoint file by URI, verify its hash, cache it by content, and record where it came from.

Sources:
- `hf://OWNER/REPO/PATH/IN/REPO@REVISION` (Hugging Face Hub, through huggingface_hub.hf_hub_download);
- `https://...` / `http://...` (retried by ctv2v.remote.retry's policy, an attempt slower than
  storage.min_bytes_per_s is cut off; an interrupted download resumes with an HTTP Range request from the
  partial file's size);
- `s3://BUCKET/KEY` (the cluster's object store, ctv2v.remote.storage);
- `file:///ABSOLUTE/PATH`.

A hash is required (sha256, or the md5 that MONAI's model zoo publishes) unless the source is a Hugging Face
file pinned to a 40-hex commit, which is immutable; a branch such as `main` is not. The sha256 is always
computed and recorded. Files are verified before they enter the content-addressed cache
(`<cache>/sha256/<hex>`, by default `<ctv2v.files.cache_root()>/checkpoints`), so a wrong hash or a truncated
download leaves nothing behind, and a rerun with the same expected hash is served from the cache without
touching the network.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from ctv2v.config import StorageConfig
from ctv2v.files import atomic_path, atomic_write_text, cache_root, new_hidden_file
from ctv2v.remote.retry import MinThroughput, RetriesExhausted, RetryPolicy, remote_policy
from ctv2v.remote.storage import StorageAccessDeniedError, StorageError, download, upload

log = logging.getLogger(__name__)

RECORD_NAME = "fetch-record.json"
"""The provenance record written beside a fetched file."""
MIRROR_HINT = ("if this machine cannot reach it, copy the file into the cluster's object store with "
               "`ctv2v checkpoint mirror FILE s3://BUCKET/KEY` and use that s3:// URI with the sha256 it prints")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HEX = {"sha256": re.compile(r"^[0-9a-f]{64}$"), "md5": re.compile(r"^[0-9a-f]{32}$")}
_CHUNK = 1 << 20


class CheckpointFetchError(RuntimeError):
    """A checkpoint could not be fetched or verified; nothing was left in the cache or the output folder."""


class SourceUnreachableError(CheckpointFetchError):
    """The source could not be reached or read (network, server, permissions, missing object)."""


class HashMismatchError(CheckpointFetchError):
    """The fetched bytes do not have the expected hash."""


@dataclass(frozen=True)
class FetchRecord:
    """Where a checkpoint came from and what exactly was received."""

    source: str
    revision: str | None
    """The Hugging Face revision asked for (None for other sources)."""
    file: str
    """The file's name inside the output folder."""
    size: int
    sha256: str
    md5: str
    fetched_at: str
    """UTC time, ISO 8601."""
    from_cache: bool
    weights: str = "pretrained"
    """"pretrained", or "stand-in" for a random-weight file of the same layout (ctv2v.steps.fetch_checkpoint)."""

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON form (what `fetch-record.json` holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FetchRecord:
        """A record from its JSON form; a missing or unknown field is a ValueError naming it, a JSON value that
        is not an object a TypeError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"not a fetch record: expected a JSON object, found {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        if unknown or missing:
            raise ValueError(f"not a fetch record: missing fields {missing}, unknown fields {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class _Source:
    scheme: str
    location: str
    """URL, s3:// URI, local path, or `owner/repo` for Hugging Face."""
    filename: str
    """Path inside a Hugging Face repo, else the last path component."""
    revision: str | None = None


def parse_source(source: str) -> _Source:
    """Split a checkpoint URI into scheme, location, file name and (Hugging Face) revision."""
    parts = urlsplit(source)
    scheme = parts.scheme
    if scheme == "hf":
        spec = source[len("hf://"):]
        if "@" not in spec:
            raise ValueError(f"{source!r}: pin a revision: hf://OWNER/REPO/PATH@REVISION (a 40-hex commit is best)")
        path, revision = spec.rsplit("@", 1)
        pieces = path.split("/")
        if len(pieces) < 3 or not all(pieces) or not revision:
            raise ValueError(f"{source!r}: expected hf://OWNER/REPO/PATH/IN/REPO@REVISION")
        return _Source("hf", "/".join(pieces[:2]), "/".join(pieces[2:]), revision)
    if scheme in ("http", "https", "s3"):
        name = PurePosixPath(unquote(parts.path)).name
        if not parts.netloc or not name:
            raise ValueError(f"{source!r}: expected {scheme}://HOST/PATH/TO/FILE")
        return _Source(scheme, source, name)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{source!r}: file:// URIs take an absolute path (file:///path/to/file)")
        path = Path(unquote(parts.path))
        if not path.is_absolute() or not path.name:
            raise ValueError(f"{source!r}: file:// URIs take an absolute path to a file (file:///path/to/file)")
        return _Source("file", str(path), path.name)
    raise ValueError(f"{source!r}: unsupported checkpoint source; use hf://, https://, http://, s3:// or file://")


def is_immutable(source: str) -> bool:
    """True for a Hugging Face file pinned to a 40-hex commit (the only source whose bytes cannot change)."""
    parsed = parse_source(source)
    return parsed.scheme == "hf" and bool(_COMMIT.match(parsed.revision or ""))


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read once."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def _check_hex(kind: str, value: str | None) -> str | None:
    """A lower-case hex digest, or a ValueError naming the hash kind and the bad value."""
    if value is None:
        return None
    normalized = value.strip().lower()
    if not _HEX[kind].match(normalized):
        digits = 64 if kind == "sha256" else 32
        raise ValueError(f"expected {kind} {value!r} is not {digits} hex digits")
    return normalized


@dataclass(frozen=True)
class _Verified:
    path: Path
    sha256: str
    md5: str


class _Cache:
    """Content-addressed files `sha256/<hex>`, indexes `md5/<hex>` and `source/<sha256 of an immutable source>`
    -> sha256, and a staging folder for downloads in progress."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / "staging"

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256

    def _index(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, sha256: str | None, md5: str | None, immutable_source: str | None) -> _Verified | None:
        """The cached file with the expected hash(es) or pinned source, re-verified; a corrupt entry is removed."""
        for kind, key in (("md5", md5), ("source", _source_key(immutable_source))):
            if sha256 is None and key is not None and self._index(kind, key).is_file():
                sha256 = self._index(kind, key).read_text().strip()
        if sha256 is None or not self.path(sha256).is_file():
            return None
        path = self.path(sha256)
        actual_sha, actual_md5 = file_hashes(path)
        if actual_sha != sha256:
            log.warning("cache entry %s is corrupt (sha256 %s): removing it", path, actual_sha)
            path.unlink()
            return None
        if md5 is not None and actual_md5 != md5:
            return None
        return _Verified(path, actual_sha, actual_md5)

    def add(self, staged: Path, sha256: str, md5: str, immutable_source: str | None) -> _Verified:
        """Move a verified staged file into the cache (fsync, atomic rename) and index it."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, target)
        atomic_write_text(self._index("md5", md5), sha256 + "\n")
        if immutable_source is not None:
            atomic_write_text(self._index("source", _source_key(immutable_source)), sha256 + "\n")
        return _Verified(target, sha256, md5)


def _source_key(source: str | None) -> str | None:
    return hashlib.sha256(source.encode()).hexdigest() if source is not None else None


def fetch_checkpoint(
    source: str,
    out_dir: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    cache_dir: Path | None = None,
    retry: RetryPolicy | None = None,
    storage: StorageConfig | None = None,
) -> FetchRecord:
    """Fetch `source` into `out_dir` (verified, cached by sha256) and write its FetchRecord beside it.

    Requests time out after storage.timeout_s and no retry starts after storage.deadline_s (unless `retry` says
    otherwise), so a server that never answers fails the fetch in about a minute by default.
    """
    parsed = parse_source(source)
    storage = storage or StorageConfig()
    retry = retry or remote_policy(storage.deadline_s)
    sha256, md5 = _check_hex("sha256", sha256), _check_hex("md5", md5)
    if sha256 is None and md5 is None and not is_immutable(source):
        raise ValueError(
            f"{source}: an expected sha256 or md5 is required (vae.maisi.sha256 / vae.maisi.md5, or --sha256 / "
            "--md5); only a Hugging Face file pinned to a 40-hex commit may go without one"
        )
    cache = _Cache(cache_dir or cache_root() / "checkpoints")
    immutable = source if is_immutable(source) else None
    cached = cache.lookup(sha256, md5, immutable)
    if cached is not None:
        log.info("%s: served from cache %s", source, cached.path)
        return _deliver(cached, parsed, source, out_dir, from_cache=True)

    # Not tempfile.mkstemp: its 0600 would follow the file into the cache, unreadable to other users.
    staged = new_hidden_file(cache.staging / parsed.filename.replace("/", "_"), "part")
    try:
        _fetch(parsed, source, staged, retry, storage)
        actual_sha, actual_md5 = file_hashes(staged)
        for kind, expected, actual in (("sha256", sha256, actual_sha), ("md5", md5, actual_md5)):
            if expected is not None and actual != expected:
                raise HashMismatchError(
                    f"{source}: {kind} mismatch: expected {expected}, received {actual} "
                    f"({staged.stat().st_size} bytes); the file was discarded"
                )
        cached = cache.add(staged, actual_sha, actual_md5, immutable)
    finally:
        staged.unlink(missing_ok=True)
    return _deliver(cached, parsed, source, out_dir, from_cache=False)


def _deliver(cached: _Verified, parsed: _Source, source: str, out_dir: Path, from_cache: bool) -> FetchRecord:
    """Copy a verified cache entry into `out_dir` and write the record beside it (both atomically)."""
    out_dir = Path(out_dir)
    name = PurePosixPath(parsed.filename).name
    target = out_dir / name
    with atomic_path(target) as tmp:
        shutil.copyfile(cached.path, tmp)
    record = FetchRecord(
        source=source, revision=parsed.revision, file=name, size=target.stat().st_size, sha256=cached.sha256,
        md5=cached.md5, fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), from_cache=from_cache,
    )
    write_record(record, out_dir)
    log.info("%s -> %s (%d bytes, sha256 %s)", source, target, record.size, record.sha256)
    return record


def write_record(record: FetchRecord, out_dir: Path) -> Path:
    """Write `fetch-record.json` into `out_dir` atomically."""
    path = Path(out_dir) / RECORD_NAME
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2) + "\n")
    return path


def _fetch(parsed: _Source, source: str, staged: Path, retry: RetryPolicy, storage: StorageConfig) -> None:
    """Bring the source's bytes into `staged`; any failure to reach or read it is a SourceUnreachableError."""
    try:
        if parsed.scheme == "file":
            shutil.copyfile(parsed.location, staged)
        elif parsed.scheme == "s3":
            download(parsed.location, staged, storage=storage, retry=retry)
        elif parsed.scheme == "hf":
            _hf_download(parsed, staged)
        else:
            http_download(parsed.location, staged, retry=retry, storage=storage)
    except (OSError, StorageError, http.client.HTTPException, RetriesExhausted) as exc:
        # Access denied: the server was reached, so mirroring would not help (the message names the credentials).
        reachability = parsed.scheme != "file" and not isinstance(exc, StorageAccessDeniedError)
        hint = f"; {MIRROR_HINT}" if reachability else ""
        raise SourceUnreachableError(f"cannot fetch {source}: {exc}{hint}") from exc


def _hf_download(parsed: _Source, staged: Path) -> None:
    """hf_hub_download into a throwaway Hub cache beside `staged`: only verified bytes may persist anywhere."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_cache = Path(tempfile.mkdtemp(prefix=".hf-", dir=staged.parent))
    try:
        path = hf_hub_download(parsed.location, parsed.filename, revision=parsed.revision, cache_dir=hub_cache)
        shutil.copyfile(path, staged)
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        cause = exc.__cause__ or exc.__context__
        raise OSError(str(exc).splitlines()[0] + (f" ({cause})" if cause else "")) from exc
    finally:
        shutil.rmtree(hub_cache, ignore_errors=True)


def http_download(url: str, dest: Path, *, retry: RetryPolicy, storage: StorageConfig) -> None:
    """Download `url` into `dest`, resuming from `dest`'s size with a Range request after an interruption.

    Each request times out after storage.timeout_s, an attempt slower than storage.min_bytes_per_s fails.
    Connection errors, timeouts, too slow or truncated bodies and 5xx/408/429 replies are retried by `retry`;
    other HTTP errors fail at once (an OSError naming the status).
    """
    dest = Path(dest)
    try:
        retry.call(f"download of {url}", lambda: _http_attempt(url, dest, storage.timeout_s, MinThroughput.of(storage)),
                   _is_transient)
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} {exc.reason}") from exc


def _is_transient(exc: Exception) -> bool:
    """A failure a retry may cure: no connection, a timeout, a cut-off body, or a 408/429/5xx reply."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (408, 429) or exc.code >= 500
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def _http_attempt(url: str, dest: Path, timeout_s: float, min_throughput: MinThroughput) -> None:
    have = dest.stat().st_size if dest.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ctv2v"})
    if have:
        log.info("%s: resuming from byte %d", url, have)
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            total = _range_total(exc.headers.get("Content-Range"))
            if total == have:
                return  # the previous attempt already had every byte
            dest.unlink()
            raise http.client.HTTPException(f"range {have}- not satisfiable (size {total}); restarting") from exc
        raise
    with response:
        if have and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != have:
                dest.unlink()
                raise http.client.HTTPException(f"server resumed at byte {start}, not {have}; restarting")
            mode, expected_total = "ab", _range_total(response.headers.get("Content-Range"))
        else:
            # 200: a fresh download, or a server that ignores Range: start over.
            mode, have = "wb", 0
            length = response.headers.get("Content-Length")
            expected_total = int(length) if length is not None else None
        with open(dest, mode) as out:
            for block in min_throughput.blocks(response.read1, _CHUNK):
                out.write(block)
    size = dest.stat().st_size
    if expected_total is not None and size != expected_total:
        raise http.client.IncompleteRead(b"", expected_total - size)


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


def _range_total(content_range: str | None) -> int | None:
    match = re.match(r"bytes (?:\d+-\d+|\*)/(\d+)", content_range or "")
    return int(match.group(1)) if match else None


def mirror(file: Path, s3_uri: str, *, storage: StorageConfig | None = None) -> str:
    """Upload a local checkpoint copy to the cluster's object store; returns its sha256 for the config."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such checkpoint file to mirror")
    digest, _ = file_hashes(file)
    upload(file, s3_uri, storage=storage)
    return digest


def read_record(path: Path) -> FetchRecord:
    """The FetchRecord in a fetch output folder (or the folder of a fetched file)."""
    path = Path(path)
    record_path = path / RECORD_NAME if path.is_dir() else path.parent / RECORD_NAME
    try:
        return FetchRecord.from_dict(json.loads(record_path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointFetchError(f"{record_path}: not a readable fetch record ({exc})") from exc


def checkpoint_file(path: Path) -> Path:
    """A checkpoint file, given either the file or a fetch output folder (whose record names the file)."""
    path = Path(path)
    if path.is_dir():
        return path / read_record(path).file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or fetch output folder")
    return path
