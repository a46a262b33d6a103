"""Preprocessing cache: each volume is decoded and its thick series made once, then loaded from .npz.

An entry is keyed by the volume's content sha256 (from the manifest) and a hash of every setting that changes
the output (thick method, factor and thickness, the DICOM spacing tolerance, the reader and cache format
versions), so a changed setting or changed data gets a new entry and nothing stale is ever reused. An entry is
`<key>.npz` (arrays; stored as int16 when that is lossless, always returned as float32) plus `<key>.json`
(metadata and the .npz's sha256), both written atomically, the .json last: it is the commit record. A .npz whose bytes do not match its recorded sha256 is a CacheError naming the
file; it is not silently re-read from the source, because a corrupt cache means a disk or a writer problem
someone has to look at.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctv2v.config import DataConfig
from ctv2v.data.manifest import volume_sha256
from ctv2v.data.readers import READER_VERSION, read_volume
from ctv2v.data.thick import ThickSeries, resample_spacing, simulate_thick
from ctv2v.files import atomic_path, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 2


class CacheError(RuntimeError):
    """A cache entry or its source is not what the manifest says; the message names the file."""


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """One volume ready for clips: thin HU volume, its thick series, and the geometry to write results back."""

    volume_id: str
    thin: np.ndarray
    """float32 HU, (slice, row, col)."""
    thick: ThickSeries
    """Thick slice j lies on thin slice j * thick.factor."""
    spacing: tuple[float, float, float]
    """Thin (slice, row, col) spacing in mm."""
    affine: np.ndarray
    """4x4: thin voxel index (slice, row, col) -> RAS+ world mm."""

    @property
    def thick_description(self) -> str:
        """How the thick series was made (stated next to every number)."""
        return self.thick.describe()


def cache_key(entry: dict, data: DataConfig) -> str:
    """The cache key of a manifest entry under `data`'s settings."""
    paired = entry["thick_method"] == "paired"
    material = {
        "format": CACHE_FORMAT,
        "reader": READER_VERSION,
        "content": entry["sha256"],
        "slice_spacing_tolerance": data.slice_spacing_tolerance,
        "resample": data.resample.model_dump(),
        "thick": ({"paired": entry["thick"]["sha256"], "thin_offset": entry["thick"]["thin_offset"],
                   "factor": data.thick.factor} if paired else data.thick.model_dump()),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _read_checked(dataset_dir: Path, rel_path: str, expected_sha256: str, data: DataConfig):
    source = dataset_dir / rel_path
    actual = volume_sha256(source)
    if actual != expected_sha256:
        raise CacheError(f"{source}: content sha256 {actual} differs from the manifest's {expected_sha256}; "
                         "the dataset changed after the manifest was built")
    return read_volume(source, data.slice_spacing_tolerance, data.max_volume_bytes)


def preprocess(dataset_dir: Path, entry: dict, data: DataConfig) -> Preprocessed:
    """Read a manifest entry's volume from the dataset folder and make its thick series (no cache)."""
    dataset_dir = Path(dataset_dir)
    volume = _read_checked(dataset_dir, entry["path"], entry["sha256"], data)
    thin, affine, spacing = volume.array, volume.affine, volume.spacing
    if entry["thick_method"] == "paired":
        if data.resample.slice_mm is not None or data.resample.pixel_mm is not None:
            raise CacheError(f"{entry['path']}: data.resample would break the pairing with its real thick series "
                             f"{entry['thick']['path']}; leave data.resample unset for paired datasets")
        pair = entry["thick"]
        thick_volume = _read_checked(dataset_dir, pair["path"], pair["sha256"], data)
        offset, k = pair["thin_offset"], data.thick.factor
        # Drop thin slices before thick slice 0 so that thick slice j lies on thin slice j * k, as simulated ones do.
        thin = thin[offset:]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ [offset, 0, 0] + affine[:3, 3]
        thick_mm = k * volume.spacing[0]
        thick = ThickSeries(thick_volume.array, k, thick_mm, thick_mm, "paired")
    else:
        thin, spacing, affine = resample_spacing(thin, spacing, affine, data.resample)
        thick = simulate_thick(thin, spacing[0], data.thick)
    return Preprocessed(entry["id"], np.ascontiguousarray(thin), thick, spacing, affine)


def _compact(hu: np.ndarray) -> np.ndarray:
    """int16 if that holds `hu` exactly (CT is stored as integers: half the bytes to hash and load), else as is."""
    if hu.size and np.abs(hu).max() <= np.iinfo(np.int16).max and np.array_equal(np.rint(hu), hu):
        return hu.astype(np.int16)
    return hu


class PreprocessCache:
    """Preprocessed volumes on disk under `root`, keyed by content and settings."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def paths(self, entry: dict, data: DataConfig) -> tuple[Path, Path]:
        """The .npz and .json files of an entry."""
        key = cache_key(entry, data)
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, dataset_dir: Path, entry: dict, data: DataConfig) -> Preprocessed:
        """The preprocessed volume of a manifest entry: from the cache, or read, preprocessed and stored."""
        arrays_path, meta_path = self.paths(entry, data)
        if meta_path.exists():
            return self._read(entry, arrays_path, meta_path)
        result = preprocess(dataset_dir, entry, data)
        self._write(result, entry, arrays_path, meta_path)
        log.info("cached %s (%s) in %s", entry["id"], result.thick_description, arrays_path)
        return result

    def _write(self, result: Preprocessed, entry: dict, arrays_path: Path, meta_path: Path) -> None:
        with atomic_path(arrays_path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, thin=_compact(result.thin), thick=_compact(result.thick.array), affine=result.affine,
                     spacing=np.asarray(result.spacing))
        thick = result.thick
        meta = {
            "cache_format": CACHE_FORMAT, "volume_id": entry["id"], "content_sha256": entry["sha256"],
            "npz_sha256": sha256_file(arrays_path),
            "thick": {"factor": thick.factor, "spacing_mm": thick.spacing_mm, "thickness_mm": thick.thickness_mm,
                      "method": thick.method},
            "description": thick.describe(),
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")

    def _read(self, entry: dict, arrays_path: Path, meta_path: Path) -> Preprocessed:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CacheError(f"{meta_path}: corrupt cache metadata ({exc}); delete it to rebuild the entry") from exc
        if not arrays_path.exists():
            raise CacheError(f"{arrays_path}: missing, but {meta_path.name} records it; delete {meta_path} to rebuild")
        actual = sha256_file(arrays_path)
        if actual != meta["npz_sha256"]:
            raise CacheError(f"{arrays_path}: sha256 {actual} does not match {meta['npz_sha256']} recorded in "
                             f"{meta_path.name}; the cache entry is corrupt, delete both files to rebuild it")
        with np.load(arrays_path) as arrays:
            thin, thick_array = arrays["thin"].astype(np.float32), arrays["thick"].astype(np.float32)
            affine, spacing = arrays["affine"], tuple(float(s) for s in arrays["spacing"])
        t = meta["thick"]
        thick = ThickSeries(thick_array, t["factor"], t["spacing_mm"], t["thickness_mm"], t["method"])
        return Preprocessed(entry["id"], thin, thick, spacing, affine)
