"""Dataset folders, manifests and the patient-level split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctv2v.config import SplitConfig, ThickConfig
from ctv2v.data.manifest import (ManifestError, assign_splits, build_manifest, discover_volumes, load_manifest,
                                 split_counts, volume_sha256, write_manifest)


def _nifti(path: Path, slices: int = 9, value: float = 0.0, spacing: float = 1.0, origin_z: float = 0.0) -> Path:
    """A small real NIfTI file: (x, y, z) = (5, 4, slices), RAS affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(5 * 4 * slices, dtype=np.int16).reshape(5, 4, slices) + int(value)
    affine = np.diag([1.0, 1.0, spacing, 1.0])
    affine[2, 3] = origin_z
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _dataset(root: Path, patients: dict[str, list[str]]) -> Path:
    """A dataset folder with one small NIfTI per volume and patients.json naming each volume's patient."""
    mapping = {}
    for n, (patient, volumes) in enumerate(patients.items()):
        for m, rel in enumerate(volumes):
            _nifti(root / rel, value=100 * n + m)
            mapping[rel] = patient
    (root / "patients.json").write_text(json.dumps(mapping))
    return root


# ---------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("n, expected", [
    (1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (4, (2, 1, 1)), (5, (3, 1, 1)), (7, (4, 2, 1)),
    (10, (6, 2, 2)), (11, (7, 2, 2)), (100, (60, 20, 20)),
])
def test_split_counts_default_fractions(n, expected):
    assert tuple(split_counts(n, SplitConfig()).values()) == expected


def test_split_counts_zero_fraction_gets_nobody():
    assert split_counts(5, SplitConfig(train=0.8, val=0.2, test=0.0)) == {"train": 4, "val": 1, "test": 0}
    # Fewer patients than non-zero fractions: plain largest remainder, no minimum of one.
    assert split_counts(2, SplitConfig(train=0.9, val=0.05, test=0.05)) == {"train": 2, "val": 0, "test": 0}
    assert split_counts(3, SplitConfig(train=0.9, val=0.05, test=0.05)) == {"train": 1, "val": 1, "test": 1}


def test_assign_splits_is_deterministic_and_seeded():
    patients = [f"p{i:02d}" for i in range(20)]
    first = assign_splits(patients, SplitConfig(seed=3))
    assert first == assign_splits(list(reversed(patients)), SplitConfig(seed=3))
    assert [first[p] for p in patients].count("train") == 12
    by_seed = {tuple(sorted(assign_splits(patients, SplitConfig(seed=s)).items())) for s in range(5)}
    assert len(by_seed) > 1


@pytest.mark.parametrize("layout", [
    {"a": ["a1.nii.gz"], "b": ["b1.nii.gz"], "c": ["c1.nii.gz"]},
    {"a": ["a1.nii.gz", "a2.nii.gz", "sub/a3.nii"], "b": ["b1.nii.gz"], "c": ["c/1.nii.gz", "c/2.nii.gz"]},
    {f"p{i}": [f"p{i}/scan{j}.nii.gz" for j in range(1 + i % 3)] for i in range(11)},
    {"only": ["x.nii.gz", "y.nii.gz", "z.nii.gz"]},
])
def test_no_patient_in_two_splits(tmp_path, layout):
    split = SplitConfig(seed=11)
    manifest = build_manifest(_dataset(tmp_path / "ds", layout), split, ThickConfig())
    splits_of: dict[str, set[str]] = {}
    for entry in manifest["volumes"]:
        splits_of.setdefault(entry["patient_id"], set()).add(entry["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    per_split = {name: sum(1 for s in splits_of.values() if s == {name}) for name in ("train", "val", "test")}
    assert per_split == split_counts(len(layout), split)
    assert sum(len(ids) for ids in manifest["splits"].values()) == sum(len(v) for v in layout.values())
    assert manifest == build_manifest(tmp_path / "ds", split, ThickConfig())


def test_demo_manifest_three_patients_fill_three_splits(demo_dir):
    manifest = build_manifest(demo_dir, SplitConfig(), ThickConfig(method="subsample", factor=2))
    assert all(manifest["splits"][name] for name in ("train", "val", "test"))
    split_of = {v["id"]: v["split"] for v in manifest["volumes"]}
    assert split_of["example_ct"] == split_of["example_ct_sm"]
    dicom = next(v for v in manifest["volumes"] if v["id"] == "example_ct_dicom")
    assert dicom["format"] == "dicom" and dicom["shape"] == [20, 512, 512]
    assert manifest["thick"] == {"method": "subsample", "factor": 2, "thickness_mm": None}
    assert {v["thick_method"] for v in manifest["volumes"]} == {"subsample"}


# --------------------------------------------------------------------------------------- patient ids
def test_patient_id_sources(demo_dir, tmp_path):
    root = tmp_path / "ds"
    _nifti(root / "listed.nii.gz", value=1)
    _nifti(root / "nested" / "alone.nii.gz", value=2)
    series = shutil.copytree(demo_dir / "example_ct_dicom", root / "series")
    for path in series.iterdir():
        ds = pydicom.dcmread(path)
        ds.PatientID = "PAT-0042"
        ds.save_as(path)
    (root / "patients.json").write_text(json.dumps({"listed.nii.gz": "patient-x"}))
    manifest = build_manifest(root, SplitConfig(), ThickConfig())
    got = {v["id"]: (v["patient_id"], v["patient_id_source"]) for v in manifest["volumes"]}
    assert got == {"listed": ("patient-x", "patients.json"), "nested__alone": ("nested__alone", "volume id"),
                   "series": ("PAT-0042", "dicom PatientID")}


def test_dicom_content_hash_ignores_file_names(demo_dir, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, path in enumerate(sorted((demo_dir / "example_ct_dicom").iterdir())):
        shutil.copy(path, renamed / f"slice{19 - i}.dcm")
    assert volume_sha256(renamed) == volume_sha256(demo_dir / "example_ct_dicom")
    (renamed / "slice3.dcm").write_bytes((renamed / "slice3.dcm").read_bytes() + b"\x00")
    assert volume_sha256(renamed) != volume_sha256(demo_dir / "example_ct_dicom")


# ----------------------------------------------------------------------------------- folder problems
def test_discovery_rules(tmp_path):
    root = tmp_path / "ds"
    _nifti(root / "a.nii.gz")
    _nifti(root / "deep" / "er" / "b.nii")
    (root / "series").mkdir()
    (root / "series" / "IM0001").write_bytes(b"x")
    (root / ".hidden").mkdir()
    _nifti(root / ".hidden" / "ignored.nii.gz")
    (root / "DICOMDIR").write_bytes(b"index")
    assert discover_volumes(root) == ["a.nii.gz", "deep/er/b.nii", "series"]


@pytest.mark.parametrize("make, message", [
    (lambda r: (r / "README.txt").write_text("hi"), "README.txt: unexpected file at the top"),
    (lambda r: (r / "series" / "IM0001").write_bytes(b"x"), "x.nii.gz: NIfTI file inside the DICOM series folder"),
    (lambda r: (r / "patients.json").write_text('{"nope.nii.gz": "p"}'), "key 'nope.nii.gz' is not a volume"),
    (lambda r: (r / "patients.json").write_text("{not json"), "patients.json: not valid JSON"),
    (lambda r: _nifti(r / "series__x.nii.gz"), "have the same id 'series__x'"),
])
def test_folder_problems_are_named(tmp_path, make, message):
    root = tmp_path / "ds"
    _nifti(root / "a.nii.gz")
    _nifti(root / "series" / "x.nii.gz")
    make(root)
    with pytest.raises(ManifestError, match=message):
        build_manifest(root, SplitConfig(), ThickConfig())


# ---------------------------------------------------------------------------------------------- pairs
@pytest.mark.parametrize("offset", [0, 2])
def test_real_pairs_replace_simulation(tmp_path, offset):
    root = tmp_path / "ds"
    _nifti(root / "thin.nii.gz", slices=17)
    # The thick scan: every 4th thin position starting at `offset`, 4 mm apart.
    _nifti(root / "thick.nii.gz", slices=3, spacing=4.0, origin_z=float(offset), value=7)
    (root / "pairs.json").write_text(json.dumps({"thin.nii.gz": "thick.nii.gz"}))
    manifest = build_manifest(root, SplitConfig(), ThickConfig(factor=4))
    [entry] = manifest["volumes"]
    assert entry["thick_method"] == "paired"
    assert entry["thick"]["path"] == "thick.nii.gz" and entry["thick"]["thin_offset"] == offset
    assert entry["thick"]["shape"] == [3, 4, 5]


def test_pair_with_another_factor_is_refused(tmp_path):
    root = tmp_path / "ds"
    _nifti(root / "thin.nii.gz", slices=17)
    _nifti(root / "thick.nii.gz", slices=5, spacing=3.0)
    (root / "pairs.json").write_text(json.dumps({"thin.nii.gz": "thick.nii.gz"}))
    with pytest.raises(ManifestError, match=r"thick.nii.gz \(thick\) paired with .*thin.nii.gz \(thin\): thick slice "
                                            r"step .* is not 4 x the thin step"):
        build_manifest(root, SplitConfig(), ThickConfig(factor=4))


# ------------------------------------------------------------------------------------------ files
def test_write_load_round_trip_and_missing_keys(tmp_path):
    _dataset(tmp_path / "ds", {"a": ["a.nii.gz"], "b": ["b.nii.gz"]})
    manifest = build_manifest(tmp_path / "ds", SplitConfig(), ThickConfig())
    write_manifest(manifest, tmp_path / "out" / "manifest.json")
    assert load_manifest(tmp_path / "out" / "manifest.json") == manifest
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]
    del manifest["volumes"][1]["sha256"]
    write_manifest(manifest, tmp_path / "bad.json")
    with pytest.raises(ManifestError, match=r"bad.json: volumes\[1\] lacks key\(s\) \['sha256'\]"):
        load_manifest(tmp_path / "bad.json")
