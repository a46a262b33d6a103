"""Atomic file writes (a temporary file in the same folder, fsync, rename: readers never see half a file), file
hashes, and the cache root that downloaded data and checkpoints share.

Files are created with mode 0666 filtered by the process umask (as `open()` does), not tempfile.mkstemp's
0600: steps running as other users on a shared volume must be able to read what a step wrote.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically; identical content gives byte-identical files."""
    import torch

    buffer = io.BytesIO()
    # torch.save(obj, path) names the zip's records after the file, i.e. after a random temporary name; saved
    # to a buffer they are always `archive/...`, so identical content gives identical bytes (checkable hashes).
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _unique_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


def new_hidden_dir(path: Path, tag: str) -> Path:
    """Create and return a new, uniquely named hidden folder beside `path` (`.<name>.<tag>-<random>`).

    Unlike tempfile.mkdtemp (mode 0700) the umask decides its mode, like any folder a step writes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        folder = _unique_name(path, tag)
        try:
            folder.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return folder


def new_hidden_file(path: Path, tag: str) -> Path:
    """Create and return a new, empty, uniquely named hidden file beside `path`; the umask decides its mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = _unique_name(path, tag)
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


class atomic_path:
    """Context manager yielding a temporary path next to `path`; on success it is fsynced and renamed into place.

    On any exception the temporary file is removed and `path` is left as it was.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.tmp = new_hidden_file(self.path, "tmp")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.tmp, self.path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where downloads are cached (demo data, checkpoints): `$CTV2V_CACHE`, else `~/.cache/ctv2v`."""
    root = os.environ.get("CTV2V_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "ctv2v"


class UnsafeOrCorruptFileError(ValueError):
    """A torch file was refused by safe loading or cannot be read; the message names the file."""


def load_torch_file(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) of `path`; a refused or unreadable file is one error naming it.

    `what` says what the file should be ("training checkpoint", "VAE weights"). A file that would import a
    global (run code) when unpickled is refused, naming the global; loading is never retried unsafely.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _blocked_globals(path, str(exc)) if "weights only load failed" in str(exc).lower() else []
        if blocked:
            raise UnsafeOrCorruptFileError(
                f"{path}: refused as {what}: unpickling it would import {', '.join(blocked)} (code, not tensors); "
                "only tensors and plain containers are loaded"
            ) from None
        raise UnsafeOrCorruptFileError(f"{path}: not a readable {what} (truncated, corrupt or not a torch "
                                       "file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UnsafeOrCorruptFileError(f"{path}: not a readable {what} (truncated or corrupt?): "
                                       f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _blocked_globals(path: Path, message: str) -> list[str]:
    """The globals a refused pickle imports: from torch's message, else by reading its opcodes (never running them)."""
    import pickletools
    import re
    import zipfile

    named = re.findall(r"GLOBAL ([\w.]+)", message)
    if named:
        return sorted(set(named))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        else:
            pickled = path.read_bytes()
        found, strings = set(), []
        for opcode, argument, _ in pickletools.genops(pickled):
            if opcode.name == "GLOBAL":
                found.add(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
    except Exception:  # the opcode scan only enriches the message; a pickle it cannot walk still gets refused
        return []
    return sorted(found)
