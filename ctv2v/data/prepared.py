"""A prepared data folder: what the `prepare-data` step writes and every later step reads.

    <data_dir>/manifest.json        patient-level split + content hash per volume (both variants share it)
    <data_dir>/dataset              the staged dataset folder (a copy from S3, or a link to a local/PVC folder)
    <data_dir>/preprocess-cache/    thin + thick arrays keyed by content hash and preprocessing settings
    <data_dir>/.ctv2v-created       the entries ctv2v made in the folder (ctv2v.files.CREATED_MARKER)

Nothing a user owns is ever deleted: a prepared folder is replaced, and its `dataset` entry re-staged, only when
the marker lists everything in it (anything a user added is refused, naming it). `prepare_data` works in a new
hidden sibling of `<data_dir>` and renames it into place at the end, so `<data_dir>` is always either the
previous prepared folder or the new one, never a mix; a failed run removes only its sibling.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.data.cache import CacheError, Preprocessed, PreprocessCache
from ctv2v.data.manifest import ManifestError, build_manifest, load_manifest, write_manifest
from ctv2v.data.readers import VolumeError
from ctv2v.files import (
    check_only_created,
    check_output_folder,
    claim_output_folder,
    created_by_ctv2v,
    new_hidden_dir,
    record_created,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
DATASET_DIR = "dataset"
PREPROCESS_CACHE_DIR = "preprocess-cache"
SPLITS = ("train", "val", "test")


class PreparedDataError(ValueError):
    """A prepared data folder is missing a part, or a split is empty."""


def run_workspace(workspace_root: str | Path, pipeline_run_id: str) -> Path:
    """The folder one pipeline run works in on the workspace volume: <workspace_root>/runs/<run id>."""
    if not pipeline_run_id or "/" in pipeline_run_id or pipeline_run_id in (".", ".."):
        raise PreparedDataError(f"pipeline run id {pipeline_run_id!r} cannot name a workspace folder")
    return Path(workspace_root) / "runs" / pipeline_run_id


def _source_folder(source: str) -> Path:
    if source == "demo":
        from ctv2v.data.demo import fetch_demo

        return fetch_demo()
    folder = Path(source).expanduser().resolve()
    if not folder.is_dir():
        raise PreparedDataError(f"data.source {source!r}: not a folder, `demo`, or an s3:// URI")
    return folder


def stage_dataset(source: str, data_dir: Path, config: RunConfig) -> Path:
    """Make `<data_dir>/dataset` hold the dataset named by `source` (`demo`, `s3://bucket/prefix`, or a folder).

    `data_dir` must be new, empty or created by ctv2v (ctv2v.files.claim_output_folder) and must not overlap the
    dataset; an existing `dataset` entry is replaced only if ctv2v made it and all it holds. Returns the folder to
    read volumes from, so that errors name the user's own files: the user's folder itself for `demo` or a folder,
    the staged copy for S3.
    """
    folder = None if source.startswith("s3://") else _source_folder(source)
    data_dir = Path(data_dir)
    if folder is not None and (data_dir.resolve().is_relative_to(folder) or folder.is_relative_to(data_dir.resolve())):
        raise PreparedDataError(f"data.source {source!r} and the output folder {data_dir} overlap: the prepared "
                                "folder must be outside the dataset folder and must not contain it")
    claim_output_folder(data_dir)
    target = data_dir / DATASET_DIR
    if target.exists() or target.is_symlink():
        check_only_created(data_dir, DATASET_DIR)
        if target.is_symlink():
            target.unlink()  # a link ctv2v made: removing it leaves the folder it points to untouched
        else:
            shutil.rmtree(target)  # a copy ctv2v staged, holding nothing else (checked above)
    if folder is None:
        from ctv2v.remote.storage import download_prefix

        staging = new_hidden_dir(target, "staging")
        try:
            files = download_prefix(source, staging, storage=config.storage)
        except BaseException:
            shutil.rmtree(staging)  # made just above
            raise
        staging.rename(target)
        record_created(data_dir, DATASET_DIR)
        log.info("staged %d objects from %s into %s", len(files), source, target)
        return target
    os.symlink(folder, target, target_is_directory=True)
    record_created(data_dir, DATASET_DIR)
    log.info("dataset %s linked at %s", folder, target)
    return folder


def _reuse_cache(previous: Path, work: Path) -> None:
    """Hard-link a previous prepared folder's cache entries into `work` (entries are immutable, keyed by content)."""
    old_cache = previous / PREPROCESS_CACHE_DIR
    if not created_by_ctv2v(previous) or not old_cache.is_dir():
        return
    new_cache = work / PREPROCESS_CACHE_DIR
    new_cache.mkdir()
    try:
        for entry in old_cache.iterdir():
            if entry.is_file() and not entry.name.startswith("."):
                os.link(entry, new_cache / entry.name)
    except OSError as exc:
        log.warning("cannot hard-link the cache of %s (%s): entries are rebuilt from the dataset", previous, exc)


def _swap_in(work: Path, data_dir: Path) -> None:
    """Put the finished `work` folder at `data_dir`: over an empty folder, or in place of one holding only what
    ctv2v made (checked again: the user may have added something while this run prepared)."""
    check_output_folder(data_dir, replace=True)
    if not created_by_ctv2v(data_dir):
        work.rename(data_dir)  # rename(2) replaces an empty folder and refuses a non-empty one
        return
    retired = new_hidden_dir(data_dir, "replaced")
    data_dir.replace(retired)  # over the empty folder just made
    work.rename(data_dir)
    shutil.rmtree(retired)  # holds only entries ctv2v made (checked above); a dataset link is removed, not followed


def prepare_data(config: RunConfig, data_dir: Path) -> dict:
    """Stage the dataset, write the split manifest, preprocess every volume into the cache; returns the manifest.

    Works in a new sibling of `data_dir` and swaps it in at the end; `data_dir` must be new, empty, or a folder
    ctv2v created that holds nothing else.
    """
    data_dir = Path(data_dir)
    check_output_folder(data_dir, replace=True)
    work = new_hidden_dir(data_dir, "preparing")
    dataset = None
    try:
        claim_output_folder(work)
        _reuse_cache(data_dir, work)
        dataset = stage_dataset(config.data.source, work, config)
        manifest = build_manifest(dataset, config.data.split, config.data.thick, config.data.slice_spacing_tolerance,
                                  config.data.max_volume_bytes)
        for split in SPLITS:
            if config.data.split.model_dump()[split] > 0 and not manifest["splits"][split]:
                raise PreparedDataError(f"{config.data.source}: the {split!r} split is empty "
                                        f"({len(manifest['volumes'])} volumes); add patients or change data.split")
        cache = PreprocessCache(work / PREPROCESS_CACHE_DIR)
        for entry in manifest["volumes"]:
            cache.load(dataset, entry, config.data)
        write_manifest(manifest, work / MANIFEST_FILE)
        write_resolved(config, work)
        record_created(work)
        _swap_in(work, data_dir)
    except (VolumeError, ManifestError, CacheError) as exc:
        _remove_work(work)
        if dataset is not None and dataset.is_relative_to(work):
            # A copy staged from S3 is gone with `work`: name the object the user gave instead.
            raise type(exc)(str(exc).replace(str(dataset), config.data.source.rstrip("/"))) from exc
        raise
    except BaseException:
        _remove_work(work)
        raise
    return manifest


def _remove_work(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)  # made by prepare_data; it links to, never holds, the user's data


def load_split_volumes(data_dir: Path, config: RunConfig, split: str) -> list[Preprocessed]:
    """The preprocessed volumes of one split of a prepared data folder."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir / MANIFEST_FILE)
    entries = [entry for entry in manifest["volumes"] if entry["split"] == split]
    if not entries:
        raise PreparedDataError(f"{data_dir / MANIFEST_FILE}: no volume in the {split!r} split")
    cache = PreprocessCache(data_dir / PREPROCESS_CACHE_DIR)
    # Resolved: a linked dataset is read (and named in errors) at the path the user gave.
    dataset = (data_dir / DATASET_DIR).resolve()
    return [cache.load(dataset, entry, config.data) for entry in entries]
