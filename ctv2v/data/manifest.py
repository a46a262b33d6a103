"""Dataset folders, their manifest, and the deterministic patient-level split.

A dataset folder holds volumes anywhere below it: `*.nii` / `*.nii.gz` files and DICOM series folders (a
folder that directly holds files other than NIfTI files; see ctv2v.data.readers for which of its files are
read). Hidden files and folders (names starting with '.') and `DICOMDIR` files are not volumes. Two optional
files at the top level:
- `patients.json`: {relative volume path: patient id}. A volume without an entry takes its DICOM PatientID,
  else its volume id: a volume is its own patient unless told otherwise.
- `pairs.json`: {thin volume path: thick volume path} for real paired thick series of the same scan. A paired
  thick volume is then not a volume of its own; the pair replaces simulation (`thick_method: "paired"`).
Any other file at the top level is an error: a dataset folder's content is never ignored silently.

A volume's id is its relative path without the NIfTI suffix, with '/' replaced by '__' (file-name safe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from ctv2v.config import SplitConfig, ThickConfig
from ctv2v.data.readers import (MAX_VOLUME_BYTES, NIFTI_SUFFIXES, READER_VERSION, Geometry, dicom_series_files,
                                is_nifti, is_series_member, read_geometry)
from ctv2v.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PATIENTS_FILE = "patients.json"
PAIRS_FILE = "pairs.json"
SPLITS = ("train", "val", "test")
PAIR_ATOL_MM = 1e-2


class ManifestError(ValueError):
    """A dataset folder or manifest is inconsistent; the message names the file or key."""


# ------------------------------------------------------------------------------------------- discovery
def discover_volumes(dataset_dir: Path) -> list[str]:
    """Relative POSIX paths of every volume in a dataset folder (NIfTI files and DICOM series folders), sorted."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ManifestError(f"{dataset_dir}: dataset folder does not exist")
    volumes = []
    for folder, subfolders, files in os.walk(dataset_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        folder = Path(folder)
        files = sorted(f for f in files if is_series_member(f))
        nifti = [f for f in files if is_nifti(Path(f))]
        others = [f for f in files if not is_nifti(Path(f))]
        if folder == dataset_dir:
            stray = [f for f in others if f not in (PATIENTS_FILE, PAIRS_FILE)]
            if stray:
                raise ManifestError(f"{folder / stray[0]}: unexpected file at the top of the dataset folder "
                                    f"(expected volumes in {'/'.join(NIFTI_SUFFIXES)} files or DICOM series "
                                    f"folders, plus optional {PATIENTS_FILE} and {PAIRS_FILE})")
            others = []
        if others and nifti:
            raise ManifestError(f"{folder / nifti[0]}: NIfTI file inside the DICOM series folder {folder}")
        rel = folder.relative_to(dataset_dir)
        volumes.extend((rel / f).as_posix() for f in nifti)
        if others:
            volumes.append(rel.as_posix())
    if not volumes:
        raise ManifestError(f"{dataset_dir}: no volumes found")
    return sorted(volumes)


def volume_id(rel_path: str) -> str:
    """The id of the volume at `rel_path` in its dataset folder."""
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if rel_path.endswith(suffix):
            rel_path = rel_path[: -len(suffix)]
            break
    return rel_path.replace("/", "__")


def volume_sha256(path: Path) -> str:
    """sha256 of a volume's content: the file's bytes, or for a DICOM folder a hash over its files' sorted hashes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digests = sorted(sha256_file(f) for f in dicom_series_files(path))
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _read_mapping(path: Path, volumes: set[str]) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        mapping = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise ManifestError(f"{path}: must map relative volume paths to non-empty strings")
    for key in mapping:
        if key not in volumes:
            raise ManifestError(f"{path}: key {key!r} is not a volume of the dataset folder")
    return mapping


# ---------------------------------------------------------------------------------------------- pairs
def paired_thin_offset(thin: Geometry, thick: Geometry, factor: int) -> int:
    """The thin slice under thick slice 0 of a real pair; checks that the thick grid is every `factor`-th thin slice."""
    names = f"{thick.source} (thick) paired with {thin.source} (thin)"
    if thin.shape[1:] != thick.shape[1:]:
        raise ManifestError(f"{names}: in-plane shapes differ: {thick.shape[1:]} vs {thin.shape[1:]}")
    if not np.allclose(thin.affine[:3, 1:3], thick.affine[:3, 1:3], atol=PAIR_ATOL_MM):
        raise ManifestError(f"{names}: in-plane grids differ (affine columns {thick.affine[:3, 1:3].tolist()} "
                            f"vs {thin.affine[:3, 1:3].tolist()})")
    if not np.allclose(thick.affine[:3, 0], factor * thin.affine[:3, 0], atol=PAIR_ATOL_MM * factor):
        raise ManifestError(f"{names}: thick slice step {thick.affine[:3, 0].tolist()} is not {factor} x the thin "
                            f"step {thin.affine[:3, 0].tolist()} (thick.factor = {factor})")
    index = np.linalg.solve(thin.affine, thick.affine[:, 3])[:3]
    offset = int(round(index[0]))
    if np.abs(index - [offset, 0, 0]).max() > PAIR_ATOL_MM / min(thin.spacing):
        raise ManifestError(f"{names}: thick slice 0 lies at thin voxel {np.round(index, 3).tolist()}, not on a "
                            "thin slice")
    last = offset + (thick.shape[0] - 1) * factor
    if offset < 0 or last >= thin.shape[0]:
        raise ManifestError(f"{names}: thick slices cover thin slices {offset}..{last}, outside 0..{thin.shape[0] - 1}")
    return offset


# ---------------------------------------------------------------------------------------------- split
def split_counts(n_patients: int, split: SplitConfig) -> dict[str, int]:
    """Patients per split: largest remainder of n x fraction, each non-zero fraction at least 1 when n allows."""
    fractions = {name: getattr(split, name) for name in SPLITS}
    nonzero = [name for name in SPLITS if fractions[name] > 0]
    floor_one = n_patients >= len(nonzero)
    counts = {name: max(math.floor(fractions[name] * n_patients), int(floor_one and name in nonzero))
              for name in SPLITS}
    while sum(counts.values()) > n_patients:
        surplus = [name for name in SPLITS if counts[name] > int(floor_one and name in nonzero)]
        counts[max(surplus, key=lambda name: counts[name] - fractions[name] * n_patients)] -= 1
    while sum(counts.values()) < n_patients:
        counts[max(nonzero, key=lambda name: fractions[name] * n_patients - counts[name])] += 1
    return counts


def assign_splits(patient_ids: list[str], split: SplitConfig) -> dict[str, str]:
    """Patient id -> split, ordering patients by sha256(f"{seed}:{patient_id}") and filling train, val, test."""
    unique = sorted(set(patient_ids), key=lambda p: hashlib.sha256(f"{split.seed}:{p}".encode()).hexdigest())
    counts = split_counts(len(unique), split)
    assignment, start = {}, 0
    for name in SPLITS:
        for patient in unique[start:start + counts[name]]:
            assignment[patient] = name
        start += counts[name]
    return assignment


# ------------------------------------------------------------------------------------------- manifest
def build_manifest(dataset_dir: Path, split: SplitConfig, thick: ThickConfig,
                   slice_spacing_tolerance: float = 0.01, max_volume_bytes: int = MAX_VOLUME_BYTES) -> dict:
    """Every volume of a dataset folder with id, path, patient, content sha256, shape, spacing and split (read from
    headers only; a volume whose headers claim more than `max_volume_bytes` is refused)."""
    dataset_dir = Path(dataset_dir)
    found = discover_volumes(dataset_dir)
    patients = _read_mapping(dataset_dir / PATIENTS_FILE, set(found))
    pairs = _read_mapping(dataset_dir / PAIRS_FILE, set(found))
    for thin_path, thick_path in pairs.items():
        if thick_path not in found:
            raise ManifestError(f"{dataset_dir / PAIRS_FILE}: thick volume {thick_path!r} (for {thin_path!r}) "
                                "is not a volume of the dataset folder")
        if thick_path in pairs:
            raise ManifestError(f"{dataset_dir / PAIRS_FILE}: {thick_path!r} is both a thin and a thick volume")
        if thick_path in patients and patients[thick_path] != patients.get(thin_path, patients[thick_path]):
            raise ManifestError(f"{dataset_dir / PATIENTS_FILE}: paired volumes {thin_path!r} and {thick_path!r} "
                                "have different patient ids")
    if len(set(pairs.values())) != len(pairs):
        raise ManifestError(f"{dataset_dir / PAIRS_FILE}: a thick volume is paired with several thin volumes")
    ids: dict[str, str] = {}
    for rel in found:
        if volume_id(rel) in ids:
            raise ManifestError(f"{dataset_dir}: volumes {ids[volume_id(rel)]!r} and {rel!r} have the same id "
                                f"{volume_id(rel)!r}")
        ids[volume_id(rel)] = rel

    volumes = []
    for rel in found:
        if rel in pairs.values():
            continue
        geometry = read_geometry(dataset_dir / rel, slice_spacing_tolerance, max_volume_bytes)
        if rel in patients:
            patient, source = patients[rel], PATIENTS_FILE
        elif geometry.patient_id:
            patient, source = geometry.patient_id, "dicom PatientID"
        else:
            patient, source = volume_id(rel), "volume id"
        entry = {
            "id": volume_id(rel), "path": rel, "format": "dicom" if (dataset_dir / rel).is_dir() else "nifti",
            "patient_id": patient, "patient_id_source": source, "sha256": volume_sha256(dataset_dir / rel),
            "shape": list(geometry.shape), "spacing": list(geometry.spacing),
            "thick_method": "paired" if rel in pairs else thick.method, "thick": None,
        }
        if rel in pairs:
            thick_geometry = read_geometry(dataset_dir / pairs[rel], slice_spacing_tolerance, max_volume_bytes)
            entry["thick"] = {
                "path": pairs[rel], "sha256": volume_sha256(dataset_dir / pairs[rel]),
                "shape": list(thick_geometry.shape), "spacing": list(thick_geometry.spacing),
                "thin_offset": paired_thin_offset(geometry, thick_geometry, thick.factor),
            }
        volumes.append(entry)

    assignment = assign_splits([v["patient_id"] for v in volumes], split)
    for entry in volumes:
        entry["split"] = assignment[entry["patient_id"]]
    manifest = {
        "manifest_version": MANIFEST_VERSION, "reader_version": READER_VERSION,
        "slice_spacing_tolerance": slice_spacing_tolerance,
        "split": split.model_dump(), "thick": thick.model_dump(), "volumes": volumes,
        "splits": {name: [v["id"] for v in volumes if v["split"] == name] for name in SPLITS},
    }
    log.info("manifest of %s: %d volumes, %d patients, %s", dataset_dir, len(volumes), len(assignment),
             {name: len(ids_) for name, ids_ in manifest["splits"].items()})
    return manifest


REQUIRED_KEYS = ("manifest_version", "split", "thick", "volumes", "splits")
REQUIRED_VOLUME_KEYS = ("id", "path", "patient_id", "sha256", "shape", "spacing", "split", "thick_method", "thick")


def write_manifest(manifest: dict, path: Path) -> None:
    """Write a manifest as JSON atomically."""
    atomic_write_text(Path(path), json.dumps(manifest, indent=2) + "\n")


def load_manifest(path: Path) -> dict:
    """Read a manifest written by write_manifest; a missing key is a ManifestError naming it."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from exc
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{path}: manifest lacks key(s) {missing}")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest_version {manifest['manifest_version']}, expected {MANIFEST_VERSION}")
    for i, entry in enumerate(manifest["volumes"]):
        missing = [key for key in REQUIRED_VOLUME_KEYS if key not in entry]
        if missing:
            raise ManifestError(f"{path}: volumes[{i}] lacks key(s) {missing}")
    return manifest
