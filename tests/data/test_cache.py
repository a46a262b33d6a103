"""The preprocessing cache on real demo volumes: reuse without decoding, keys, corruption, real pairs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctv2v.config import DataConfig, ThickConfig
from ctv2v.data.cache import CacheError, PreprocessCache, cache_key, preprocess
from ctv2v.data.manifest import build_manifest
from ctv2v.data.readers import read_geometry
from tests.conftest import TRAINING_OVERRIDES, TRAINING_PHANTOM, prepared_phantoms, smoke_config


@pytest.fixture()
def dataset(demo_dir, tmp_path) -> Path:
    """A dataset folder with two real volumes: a small NIfTI and the JPEG 2000 DICOM series."""
    root = tmp_path / "dataset"
    root.mkdir()
    shutil.copy(demo_dir / "example_ct_sm.nii.gz", root / "small.nii.gz")
    shutil.copytree(demo_dir / "example_ct_dicom", root / "series")
    return root


def _manifest(root: Path, data: DataConfig) -> dict:
    return build_manifest(root, data.split, data.thick, data.slice_spacing_tolerance)


def test_second_load_does_not_touch_the_source(dataset, tmp_path):
    data = DataConfig()
    manifest = _manifest(dataset, data)
    cache = PreprocessCache(tmp_path / "cache")
    cold = {e["id"]: cache.load(dataset, e, data) for e in manifest["volumes"]}
    dataset.rename(tmp_path / "moved-away")  # a warm load that needed the source would fail now
    expected_description = {"small": "slab average over 12 mm every 12 mm (x4 of the thin spacing)",
                            "series": "slab average over 8 mm every 8 mm (x4 of the thin spacing)"}
    for entry in manifest["volumes"]:
        warm = cache.load(dataset, entry, data)
        first = cold[entry["id"]]
        assert warm.volume_id == entry["id"]
        np.testing.assert_array_equal(warm.thin, first.thin)
        np.testing.assert_array_equal(warm.thick.array, first.thick.array)
        np.testing.assert_array_equal(warm.affine, first.affine)
        assert warm.spacing == first.spacing and warm.thin.dtype == np.float32
        assert warm.thick_description == first.thick_description == expected_description[entry["id"]]
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".json", ".npz", ".npz"]


def test_cached_volume_equals_a_fresh_preprocess(dataset, tmp_path):
    data = DataConfig(thick=ThickConfig(method="subsample", factor=2))
    entry = next(e for e in _manifest(dataset, data)["volumes"] if e["id"] == "series")
    cache = PreprocessCache(tmp_path / "cache")
    cache.load(dataset, entry, data)
    warm, fresh = cache.load(dataset, entry, data), preprocess(dataset, entry, data)
    np.testing.assert_array_equal(warm.thin, fresh.thin)
    np.testing.assert_array_equal(warm.thick.array, fresh.thin[::2])
    assert warm.thick.method == "subsample" and warm.thick.factor == 2


def test_key_depends_on_content_and_every_output_setting(dataset):
    data = DataConfig()
    entry = _manifest(dataset, data)["volumes"][0]
    base = cache_key(entry, data)
    assert cache_key(dict(entry), DataConfig()) == base
    changed = [
        DataConfig(thick=ThickConfig(factor=2)),
        DataConfig(thick=ThickConfig(method="subsample")),
        DataConfig(thick=ThickConfig(thickness_mm=5.0)),
        DataConfig(slice_spacing_tolerance=0.05),
    ]
    keys = {cache_key(entry, other) for other in changed} | {cache_key({**entry, "sha256": "0" * 64}, data)}
    assert base not in keys and len(keys) == 5
    assert cache_key(entry, DataConfig(num_workers=3)) == base  # does not change the output


def test_corrupt_entry_is_an_error_naming_it(dataset, tmp_path):
    data = DataConfig()
    entry = _manifest(dataset, data)["volumes"][0]
    cache = PreprocessCache(tmp_path / "cache")
    cache.load(dataset, entry, data)
    arrays_path, meta_path = cache.paths(entry, data)
    blob = bytearray(arrays_path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    arrays_path.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match=rf"{arrays_path.name}: sha256 .* does not match"):
        cache.load(dataset, entry, data)
    arrays_path.unlink()
    with pytest.raises(CacheError, match=rf"{arrays_path.name}: missing, but {meta_path.name} records it"):
        cache.load(dataset, entry, data)


def test_source_changed_after_the_manifest(dataset, tmp_path):
    data = DataConfig()
    manifest = _manifest(dataset, data)
    (dataset / "small.nii.gz").write_bytes((dataset / "small.nii.gz").read_bytes() + b"\x00")
    entry = next(e for e in manifest["volumes"] if e["id"] == "small")
    with pytest.raises(CacheError, match=r"small.nii.gz: content sha256 .* differs from the manifest"):
        PreprocessCache(tmp_path / "cache").load(dataset, entry, data)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_real_pair_is_used_instead_of_simulation(demo_dir, tmp_path):
    root = tmp_path / "paired"
    root.mkdir()
    image = nib.load(demo_dir / "example_ct_sm.nii.gz")  # RAS, z is the last file axis
    shutil.copy(demo_dir / "example_ct_sm.nii.gz", root / "thin.nii.gz")
    k, offset = 3, 2
    thick_affine = image.affine.copy()
    thick_affine[:3, 2] *= k
    thick_affine[:3, 3] += offset * image.affine[:3, 2]
    thick_data = np.asarray(image.dataobj)[:, :, offset::k]
    nib.save(nib.Nifti1Image(thick_data, thick_affine), root / "thick.nii.gz")
    (root / "pairs.json").write_text(json.dumps({"thin.nii.gz": "thick.nii.gz"}))
    data = DataConfig(thick=ThickConfig(factor=k))
    [entry] = _manifest(root, data)["volumes"]
    result = PreprocessCache(tmp_path / "cache").load(root, entry, data)
    assert result.thick.method == "paired" and result.thick_description.startswith("real paired thick series")
    assert result.thin.shape[0] == 30 - offset
    np.testing.assert_array_equal(result.thick.array, result.thin[::k][: result.thick.array.shape[0]])
    # The affine moved with the dropped slices: thin slice 0 is where thick slice 0 is.
    np.testing.assert_allclose(result.affine[:3, 3], read_geometry(root / "thick.nii.gz").affine[:3, 3])


def test_non_integer_volumes_round_trip_exactly(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    values = np.random.default_rng(0).normal(0, 300, size=(6, 7, 13)).astype(np.float32)  # not integers
    nib.save(nib.Nifti1Image(values, np.eye(4)), root / "float.nii.gz")
    data = DataConfig(thick=ThickConfig(factor=3))
    [entry] = _manifest(root, data)["volumes"]
    cache = PreprocessCache(tmp_path / "cache")
    cold = cache.load(root, entry, data)
    warm = cache.load(root, entry, data)
    assert warm.thin.dtype == np.float32 and np.array_equal(warm.thin, cold.thin)
    np.testing.assert_array_equal(warm.thick.array, cold.thick.array)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_prepared_folder_is_readable_by_other_users_per_the_umask(tmp_path, umask):
    """Steps running as other users on a shared volume read these files: the umask decides, not mkstemp's 0600."""
    previous = os.umask(umask)
    try:
        prepared = prepared_phantoms(tmp_path, smoke_config(*TRAINING_OVERRIDES), volumes=3, shape=TRAINING_PHANTOM)
    finally:
        os.umask(previous)
    modes = {str(prepared): prepared.stat().st_mode & 0o777}
    for folder, subfolders, files in os.walk(prepared):
        for name in [*subfolders, *files]:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                modes[path] = os.stat(path).st_mode & 0o777
    expected = {path: (0o777 if os.path.isdir(path) else 0o666) & ~umask for path in modes}
    assert len(modes) > 5 and modes == expected
