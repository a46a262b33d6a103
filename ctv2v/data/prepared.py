"""A prepared data folder: what the `prepare-data` step writes and every later step reads.

    <data_dir>/manifest.json        patient-level split + content hash per volume (both variants share it)
    <data_dir>/dataset              the staged dataset folder (a copy from S3, or a link to a local/PVC folder)
    <data_dir>/preprocess-cache/    thin + thick arrays keyed by content hash and preprocessing settings
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.data.cache import Preprocessed, PreprocessCache
from ctv2v.data.manifest import build_manifest, load_manifest, write_manifest

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
DATASET_DIR = "dataset"
PREPROCESS_CACHE_DIR = "preprocess-cache"
SPLITS = ("train", "val", "test")


class PreparedDataError(ValueError):
    """A prepared data folder is missing a part or a split is empty."""


def run_workspace(workspace_root: str | Path, pipeline_run_id: str) -> Path:
    """The folder one pipeline run works in on the workspace volume: <workspace_root>/runs/<run id>."""
    if not pipeline_run_id or "/" in pipeline_run_id or pipeline_run_id in (".", ".."):
        raise PreparedDataError(f"pipeline run id {pipeline_run_id!r} cannot name a workspace folder")
    return Path(workspace_root) / "runs" / pipeline_run_id


def stage_dataset(source: str, data_dir: Path, config: RunConfig) -> Path:
    """Make `<data_dir>/dataset` hold the dataset named by `source`: `demo`, `s3://bucket/prefix`, or a folder."""
    target = Path(data_dir) / DATASET_DIR
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.startswith("s3://"):
        from ctv2v.remote.storage import download_prefix

        staging = target.with_name(f".{DATASET_DIR}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        files = download_prefix(source, staging, storage=config.storage)
        staging.rename(target)
        log.info("staged %d objects from %s into %s", len(files), source, target)
        return target
    if source == "demo":
        from ctv2v.data.demo import fetch_demo

        folder = fetch_demo()
    else:
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise PreparedDataError(f"data.source {source!r}: not a folder, `demo`, or an s3:// URI")
    os.symlink(folder, target, target_is_directory=True)
    log.info("dataset %s linked at %s", folder, target)
    return target


def prepare_data(config: RunConfig, data_dir: Path) -> dict:
    """Stage the dataset, write the split manifest, preprocess every volume into the cache; returns the manifest."""
    data_dir = Path(data_dir)
    dataset = stage_dataset(config.data.source, data_dir, config)
    manifest = build_manifest(dataset, config.data.split, config.data.thick, config.data.slice_spacing_tolerance)
    for split in SPLITS:
        if config.data.split.model_dump()[split] > 0 and not manifest["splits"][split]:
            raise PreparedDataError(f"{config.data.source}: the {split!r} split is empty "
                                    f"({len(manifest['volumes'])} volumes); add patients or change data.split")
    cache = PreprocessCache(data_dir / PREPROCESS_CACHE_DIR)
    for entry in manifest["volumes"]:
        cache.load(dataset, entry, config.data)
    write_manifest(manifest, data_dir / MANIFEST_FILE)
    write_resolved(config, data_dir)
    return manifest


def load_split_volumes(data_dir: Path, config: RunConfig, split: str) -> list[Preprocessed]:
    """The preprocessed volumes of one split of a prepared data folder."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir / MANIFEST_FILE)
    entries = [entry for entry in manifest["volumes"] if entry["split"] == split]
    if not entries:
        raise PreparedDataError(f"{data_dir / MANIFEST_FILE}: no volume in the {split!r} split")
    cache = PreprocessCache(data_dir / PREPROCESS_CACHE_DIR)
    return [cache.load(data_dir / DATASET_DIR, entry, config.data) for entry in entries]
