"""read_volume on the real demo CT (NIfTI and a JPEG 2000 DICOM series) and on broken copies of it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctv2v.data import VolumeError, read_volume
from ctv2v.data.readers import dicom_series_files, read_geometry


@pytest.fixture(scope="module")
def dicom_volume(demo_dir):
    return read_volume(demo_dir / "example_ct_dicom")


@pytest.fixture()
def series_copy(demo_dir, tmp_path) -> Path:
    """A writable copy of the demo DICOM series."""
    return Path(shutil.copytree(demo_dir / "example_ct_dicom", tmp_path / "series"))


def _rewrite(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _sorted_by_z(folder: Path) -> list[Path]:
    return sorted(dicom_series_files(folder), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


# ---------------------------------------------------------------------------------------------- NIfTI
def test_nifti_is_reoriented_slice_first_with_a_consistent_affine(demo_dir):
    path = demo_dir / "example_ct.nii.gz"
    volume = read_volume(path)
    image = nib.load(path)
    raw = np.asarray(image.dataobj)
    assert volume.array.dtype == np.float32
    assert volume.array.shape == (112, 101, 122)  # the file stores (x, y, z) = (122, 101, 112)
    assert volume.spacing == (3.0, 3.0, 3.0)
    assert nib.aff2axcodes(volume.affine) == ("S", "P", "L")
    rng = np.random.default_rng(0)
    for index in rng.integers(0, volume.array.shape, size=(50, 3)):
        world = volume.affine @ [*index, 1]
        original = np.round(np.linalg.solve(image.affine, world)[:3]).astype(int)
        assert volume.array[tuple(index)] == raw[tuple(original)]
    assert volume.modality is None and volume.patient_id is None


def test_nifti_axis_order_on_disk_does_not_change_the_result(demo_dir, tmp_path):
    path = demo_dir / "example_ct_sm.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    # Store the same scan as (z, x, y) with z and x flipped: a different voxel order of the same geometry.
    permuted = np.flip(data.transpose(2, 0, 1), axis=(0, 1))
    to_old = np.zeros((4, 4))
    to_old[3, 3] = 1
    to_old[2, 0] = -1
    to_old[2, 3] = data.shape[2] - 1
    to_old[0, 1] = -1
    to_old[0, 3] = data.shape[0] - 1
    to_old[1, 2] = 1
    nib.save(nib.Nifti1Image(permuted, image.affine @ to_old), tmp_path / "permuted.nii.gz")
    assert nib.aff2axcodes(image.affine @ to_old) == ("I", "L", "A")  # the file's own axes: really reordered
    reference, other = read_volume(path), read_volume(tmp_path / "permuted.nii.gz")
    np.testing.assert_array_equal(other.array, reference.array)
    np.testing.assert_allclose(other.affine, reference.affine, atol=1e-4)


def test_nifti_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        read_volume(broken)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(VolumeError, match="notes.txt"):
        read_volume(other)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), tmp_path / "four_d.nii")
    with pytest.raises(VolumeError, match=r"four_d.nii: expected a 3D volume"):
        read_volume(tmp_path / "four_d.nii")


def test_truncated_nifti_is_an_error_naming_it(demo_dir, tmp_path):
    data = (demo_dir / "example_ct_sm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="cut.nii.gz"):
        read_volume(tmp_path / "cut.nii.gz")


# ---------------------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("volume", ["example_ct_sm.nii.gz", "example_ct_dicom"])
def test_max_volume_bytes_is_checked_on_the_headers_before_any_voxel(demo_dir, volume):
    """The limit counts stored bytes + the float32 copy per voxel, exactly; read_geometry (headers only) applies it."""
    path = demo_dir / volume
    if path.is_dir():
        first = pydicom.dcmread(dicom_series_files(path)[0], stop_before_pixels=True)
        stored, voxels = first.BitsAllocated // 8, len(dicom_series_files(path)) * first.Rows * first.Columns
    else:
        image = nib.load(path)
        stored, voxels = image.get_data_dtype().itemsize, int(np.prod(image.shape))
    needed = voxels * (stored + 4)
    assert read_volume(path, max_volume_bytes=needed).array.size == voxels
    for read in (read_volume, read_geometry):
        with pytest.raises(VolumeError, match=rf"^{path}: .* reading them takes {needed} bytes .* more than "
                                              rf"data.max_volume_bytes = {needed - 1} "):
            read(path, max_volume_bytes=needed - 1)


def test_dicom_series_is_hu_sorted_along_the_normal(demo_dir, dicom_volume):
    folder = demo_dir / "example_ct_dicom"
    assert dicom_volume.array.shape == (20, 512, 512)
    assert dicom_volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert dicom_volume.modality == "CT"
    assert dicom_volume.patient_id is None  # the demo's PatientID tag is empty (anonymized)
    for i, path in enumerate(_sorted_by_z(folder)):
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(dicom_volume.array[i], expected)
        # LPS z is RAS z: slice i lies at the file's ImagePositionPatient z.
        assert (dicom_volume.affine @ [i, 0, 0, 1])[2] == pytest.approx(float(ds.ImagePositionPatient[2]))
    assert float(pydicom.dcmread(_sorted_by_z(folder)[0]).RescaleIntercept) == -1024.0


def test_dicom_hu_values_are_plausible(dicom_volume):
    air_in_front_of_the_body = dicom_volume.array[:, 40:80, 200:300]
    assert abs(np.median(air_in_front_of_the_body) + 1000) < 15
    assert -50 < np.median(dicom_volume.array[:, 240:270, 240:270]) < 100  # soft tissue near the centre


def test_dicom_geometry_without_pixels_matches(demo_dir, dicom_volume):
    geometry = read_geometry(demo_dir / "example_ct_dicom")
    assert geometry.shape == dicom_volume.array.shape
    np.testing.assert_array_equal(geometry.affine, dicom_volume.affine)


def test_shuffled_file_names_give_the_same_volume(demo_dir, dicom_volume, tmp_path):
    files = dicom_series_files(demo_dir / "example_ct_dicom")
    names = [f"img{i:03d}.dcm" for i in range(len(files))]
    random.Random(7).shuffle(names)
    target = tmp_path / "shuffled"
    target.mkdir()
    for source, name in zip(files, names):
        shutil.copy(source, target / name)
    (target / ".DS_Store").write_bytes(b"\x00\x01junk")  # hidden files are not part of the series
    (target / "DICOMDIR").write_bytes(b"an index, not an image")
    shuffled = read_volume(target)
    np.testing.assert_array_equal(shuffled.array, dicom_volume.array)
    np.testing.assert_array_equal(shuffled.affine, dicom_volume.affine)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_dicom_file_is_named(series_copy):
    victim = sorted(series_copy.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:60_000])
    with pytest.raises(VolumeError, match=victim.name):
        read_volume(series_copy)


def test_non_dicom_file_is_named(series_copy):
    (series_copy / "readme.txt").write_text("not an image")
    with pytest.raises(VolumeError, match=r"readme.txt: not a readable DICOM file"):
        read_volume(series_copy)


def test_two_series_in_one_folder(series_copy):
    for path in sorted(series_copy.iterdir())[:3]:
        _rewrite(path, SeriesInstanceUID="1.2.826.0.1.3680043.8.498.1")
    with pytest.raises(VolumeError, match=r"holds 2 series .*1.2.826.0.1.3680043.8.498.1: 3 files"):
        read_volume(series_copy)


def test_missing_middle_slice(series_copy):
    middle = _sorted_by_z(series_copy)[10]
    middle.unlink()
    with pytest.raises(VolumeError, match=r"1 missing slice\(s\) between .* \(gap 4 mm, typical 2 mm"):
        read_volume(series_copy)


def test_irregular_gap(series_copy):
    path = _sorted_by_z(series_copy)[7]
    position = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
    _rewrite(path, ImagePositionPatient=[position[0], position[1], position[2] + 0.5])
    with pytest.raises(VolumeError, match="irregular gap"):
        read_volume(series_copy)
    # The same deviation passes with a looser tolerance.
    assert read_volume(series_copy, slice_spacing_tolerance=0.3).array.shape[0] == 20


def test_duplicate_position(series_copy):
    first = sorted(series_copy.iterdir())[0]
    shutil.copy(first, series_copy / "zz_copy")
    with pytest.raises(VolumeError, match=r"duplicate slice position"):
        read_volume(series_copy)


def test_non_ct_modality_is_named(series_copy):
    path = sorted(series_copy.iterdir())[3]
    _rewrite(path, Modality="MR")
    with pytest.raises(VolumeError, match=rf"{path.name}: Modality is 'MR'"):
        read_volume(series_copy)


def test_inconsistent_orientation_is_named(series_copy):
    path = sorted(series_copy.iterdir())[4]
    c, s = np.cos(0.1), np.sin(0.1)
    _rewrite(path, ImageOrientationPatient=[c, s, 0, -s, c, 0])
    with pytest.raises(VolumeError, match=rf"{path.name}: ImageOrientationPatient"):
        read_volume(series_copy)


def test_gantry_tilt_is_refused(series_copy):
    # A 15 degree tilt: each slice is shifted along y by gap * tan(15 deg), orientation unchanged.
    for path in series_copy.iterdir():
        x, y, z = (float(v) for v in pydicom.dcmread(path).ImagePositionPatient)
        _rewrite(path, ImagePositionPatient=[x, y + (z + 766.5) * np.tan(np.radians(15)), z])
    with pytest.raises(VolumeError, match=r"15.00 degrees from it, e.g. gantry tilt"):
        read_volume(series_copy)


def test_missing_rescale_is_an_error(series_copy):
    path = sorted(series_copy.iterdir())[2]
    ds = pydicom.dcmread(path)
    del ds.RescaleIntercept
    ds.save_as(path)
    with pytest.raises(VolumeError, match=rf"{path.name}: DICOM tag RescaleIntercept is missing"):
        read_volume(series_copy)


@pytest.mark.parametrize("keep_bytes", [60_000, -20_000], ids=["early-in-pixels", "near-the-end"])
def test_dicom_cut_inside_its_pixel_data_is_called_truncated(series_copy, keep_bytes):
    victim = sorted(series_copy.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])
    with pytest.raises(VolumeError, match=rf"{victim}: truncated: the file ends inside its pixel data"):
        read_volume(series_copy)
    assert read_geometry(series_copy).shape == (20, 512, 512)  # the headers are intact


def test_nonzero_gantry_tilt_tag_on_untilted_geometry_is_read_with_a_warning(series_copy, dicom_volume, caplog):
    for path in series_copy.iterdir():
        _rewrite(path, GantryDetectorTilt=12.5)
    with caplog.at_level("WARNING", logger="ctv2v.data.readers"):
        volume = read_volume(series_copy)
    assert np.array_equal(volume.array, dicom_volume.array) and np.allclose(volume.affine, dicom_volume.affine)
    assert [r.getMessage() for r in caplog.records] == [
        f"{series_copy}: GantryDetectorTilt [12.5] degrees, but the slice positions lie along the slice normal; "
        "the series is read by its ImagePositionPatient/ImageOrientationPatient geometry"]


@pytest.mark.parametrize("where", ["block", "whole"])
def test_nan_or_inf_voxels_are_refused_naming_file_and_slices(tmp_path, where):
    data = np.zeros((6, 5, 8), dtype=np.float32)  # NIfTI (x, y, z): z becomes the slice axis
    if where == "block":
        data[1:3, 2, 4:6] = np.nan
        data[0, 0, 6] = np.inf
        expected = r"5 NaN/Inf voxel\(s\) in 3 of 8 slices \(slice indices 4..6"
    else:
        data[:] = np.nan
        expected = r"240 NaN/Inf voxel\(s\) in 8 of 8 slices \(slice indices 0..7"
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(VolumeError, match=rf"{path}: {expected}"):
        read_volume(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_nan_rescale_in_dicom_is_refused(series_copy):
    path = sorted(series_copy.iterdir())[3]
    _rewrite(path, RescaleSlope="NaN")
    with pytest.raises(VolumeError, match=rf"{series_copy}: 262144 NaN/Inf voxel\(s\) in 1 of 20 slices"):
        read_volume(series_copy)
