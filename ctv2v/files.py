"""Atomic file writes (a temporary file in the same folder, fsync, rename: readers never see half a file), outputs
written as a set, the folders ctv2v created (and may therefore replace), file hashes, and the cache root that
downloaded data and checkpoints share.

Files are created with mode 0666 filtered by the process umask (as `open()` does), not tempfile.mkstemp's
0600: steps running as other users on a shared volume must be able to read what a step wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Iterator
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


@contextlib.contextmanager
def output_set(targets: list[Path]) -> Iterator[list[Path]]:
    """Write several outputs as one: yields, for each target, a path of the same name in a new hidden folder beside
    it; when the block succeeds every staged output is renamed into place, else none is.

    A target that exists is moved aside first and put back if a later rename fails, and deleted only once all
    are in place: the caller checks beforehand that each existing target may be replaced.
    """
    targets = [Path(target) for target in targets]
    stages = [new_hidden_dir(target, "staging") for target in targets]
    try:
        yield [stage / target.name for stage, target in zip(stages, targets)]
        _rename_all([stage / target.name for stage, target in zip(stages, targets)], targets)
    finally:
        for stage in stages:
            shutil.rmtree(stage)  # made above; empty unless the block or a rename failed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _rename_all(staged: list[Path], targets: list[Path]) -> None:
    moved_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, target in zip(staged, targets):
            if target.exists() or target.is_symlink():
                aside = _unique_name(target, "replaced")
                os.rename(target, aside)
                moved_aside.append((aside, target))
            os.rename(path, target)
            placed.append(target)
    except BaseException:
        for target in placed:
            _remove(target)  # renamed into place just above
        for aside, target in moved_aside:
            os.rename(aside, target)
        raise
    for aside, _ in moved_aside:
        _remove(aside)


# ------------------------------------------------------------------------------------ folders ctv2v created
CREATED_MARKER = ".ctv2v-created"
"""In every output folder ctv2v creates: JSON listing the entries ctv2v made in it (relative path -> `file`,
`folder` or `link`; links are listed, never followed). A folder is written into only when it is new, empty or
carries this marker, and replaced only as far as the list goes: a user's notes, results or a real folder put
where ctv2v had made a link are refused, never deleted."""


class OutputFolderError(ValueError):
    """An output folder ctv2v may not write into or replace; the message names it and what is in the way."""


def _kind(path: Path) -> str:
    if path.is_symlink():
        return "link"
    return "folder" if path.is_dir() else "file"


def _entries(folder: Path) -> dict[str, str]:
    """Every entry below `folder` -> its kind (links listed, not followed); the marker itself left out."""
    found = {}
    for parent, folders, files in os.walk(folder):
        for name in [*folders, *files]:
            path = Path(parent) / name
            relative = path.relative_to(folder).as_posix()
            if relative != CREATED_MARKER:
                found[relative] = _kind(path)
    return found


def _recorded(folder: Path) -> dict[str, str] | None:
    """The entries the marker of `folder` lists; None when it has no readable marker (ctv2v did not create it)."""
    marker = Path(folder) / CREATED_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else None


def _write_marker(folder: Path, entries: dict[str, str]) -> None:
    atomic_write_text(folder / CREATED_MARKER,
                      json.dumps({"made_by": "ctv2v", "entries": dict(sorted(entries.items()))}, indent=1) + "\n")


def created_by_ctv2v(folder: Path) -> bool:
    """Whether `folder` carries ctv2v's marker, i.e. ctv2v created it."""
    return _recorded(folder) is not None


def entries_not_created(folder: Path, under: str | None = None) -> list[str]:
    """What in `folder` (or in its entry `under` and below) the marker does not list with the same kind: the
    top-most such entries, named as a user would (`notes.txt`, `myresults/`, `dataset (a folder where ctv2v
    made a link)`). In a folder without a marker, everything."""
    folder = Path(folder)
    recorded = _recorded(folder) or {}
    foreign: list[str] = []
    reported: list[str] = []
    for path, kind in sorted(_entries(folder).items()):
        if under is not None and path != under and not path.startswith(f"{under}/"):
            continue
        if any(path.startswith(f"{outer}/") for outer in reported):
            continue  # inside an entry already named
        if path not in recorded:
            foreign.append(f"{path}/" if kind == "folder" else path)
        elif recorded[path] != kind:
            foreign.append(f"{path} (a {kind} where ctv2v made a {recorded[path]})")
        else:
            continue
        reported.append(path)
    return foreign


def check_creatable(path: Path) -> None:
    """Refuse a path that cannot be created: its nearest existing ancestor is not a folder, or not writable."""
    ancestor = Path(path).absolute().parent
    while not (ancestor.exists() or ancestor.is_symlink()):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputFolderError(f"{path}: cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{path}: cannot be created: no permission to write into {ancestor}")


def check_output_folder(folder: Path, *, replace: bool = False) -> None:
    """Refuse, changing nothing, an output `folder` that cannot be created, is not a folder (a file, a link) or is
    not empty and not created by ctv2v; with `replace` (it is about to be replaced whole), also one holding
    anything the marker does not list."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputFolderError(f"{folder}: exists and is not a folder; choose a new or empty output folder")
    if not folder.exists():
        check_creatable(folder)
        return
    if not any(folder.iterdir()):
        return
    if not created_by_ctv2v(folder):
        raise OutputFolderError(f"{folder}: not empty and not a folder ctv2v created (no {CREATED_MARKER}); "
                                "nothing in it was changed: choose a new or empty output folder")
    if replace:
        check_only_created(folder)


def check_only_created(folder: Path, under: str | None = None) -> None:
    """Refuse, changing nothing, a folder (or its entry `under`) holding anything its marker does not list."""
    foreign = entries_not_created(folder, under)
    if foreign:
        raise OutputFolderError(f"{folder}: holds what ctv2v did not create: {', '.join(foreign)}; nothing in it "
                                "was changed: move those out or choose another output folder")


def claim_output_folder(folder: Path) -> Path:
    """Make `folder` ctv2v's to write into: create it, or take an empty one or one ctv2v created (its marker is
    kept); refuse anything else (check_output_folder)."""
    folder = Path(folder)
    check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not created_by_ctv2v(folder):
        _write_marker(folder, {})
    return folder


def record_created(folder: Path, *names: str) -> None:
    """Record in the marker of `folder` that ctv2v made its entries `names` and everything now below them (every
    entry of `folder` when no name is given); what the marker listed under those names before is forgotten."""
    folder = Path(folder)
    present = _entries(folder)
    if not names:
        _write_marker(folder, present)
        return

    def named(path: str) -> bool:
        return any(path == name or path.startswith(f"{name}/") for name in names)

    kept = {path: kind for path, kind in (_recorded(folder) or {}).items() if not named(path)}
    _write_marker(folder, {**kept, **{path: kind for path, kind in present.items() if named(path)}})


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
    except OSError as exc:
        raise UnsafeOrCorruptFileError(f"{path}: cannot read the {what}: {exc.strerror or _first_line(exc)}") from None
    except Exception as exc:  # torch's legacy (non-zip) reader raises KeyError, IndexError, ... on arbitrary bytes
        raise UnsafeOrCorruptFileError(f"{path}: not a readable {what} (truncated, corrupt or not a torch "
                                       f"file): {_first_line(exc)}") from None


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
