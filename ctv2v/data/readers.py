"""Read one CT volume, a NIfTI file or a DICOM series folder, as float32 HU ordered (slice, row, column).

Conventions shared by both formats:
- World coordinates are RAS+ millimetres (NIfTI's and nibabel's convention); DICOM's LPS positions are
  converted by negating x and y, so an affine can be written straight into a NIfTI header.
- Voxel axes are permuted and flipped (never resampled) to the closest of (S, P, L): the slice index grows
  toward superior, the row index toward posterior and the column index toward the patient's left, i.e. an
  axial slice looks like a radiology display. Axis 0 is thus the voxel axis closest to the body's long
  axis, the one thick-slice simulation and clips work along. The affine is updated with the reordering.

DICOM series folders: every regular file in the folder is read except hidden files (a name starting with
'.', e.g. .DS_Store or a half-written download) and `DICOMDIR` (a media index without pixels); subfolders
are not part of the series. Any other file must be a single-frame CT image of the one series, otherwise
VolumeError names it: we refuse rather than guess which files belong together.

Size: before any voxel is read or decoded, what the headers claim (NIfTI: shape x data type; DICOM: files x
Rows x Columns x BitsAllocated) plus the float32 copy the readers return must fit `max_volume_bytes`
(data.max_volume_bytes): a header is a few bytes, the voxels it claims may not fit in memory.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from ctv2v.config import DataConfig

log = logging.getLogger(__name__)

READER_VERSION = 1
"""Bump when read_volume returns something different for the same bytes (it is part of cache keys)."""

SLICE_FIRST_AXCODES = ("S", "P", "L")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DUPLICATE_POSITION_MM = 1e-3
ORIENTATION_ATOL = 1e-4
MAX_VOLUME_BYTES = DataConfig.model_fields["max_volume_bytes"].default
FLOAT32_BYTES = 4


class VolumeError(ValueError):
    """A volume cannot be read as one regular CT volume; the message names the offending file."""


@dataclass(frozen=True, eq=False)
class Geometry:
    """What a volume's headers say, without decoding its voxels."""

    shape: tuple[int, int, int]
    """(slice, row, col) after reorientation."""
    spacing: tuple[float, float, float]
    """(slice, row, col) in mm."""
    affine: np.ndarray
    """4x4: voxel index (slice, row, col) -> RAS+ world mm."""
    source: Path
    patient_id: str | None
    """DICOM PatientID when present and non-empty; NIfTI headers carry none."""
    modality: str | None
    """DICOM Modality ("CT": others are refused); None for NIfTI, whose header does not record it."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A CT volume in HU on a regular grid."""

    array: np.ndarray
    """float32 HU, (slice, row, col)."""
    spacing: tuple[float, float, float]
    """(slice, row, col) in mm."""
    affine: np.ndarray
    """4x4: voxel index (slice, row, col) -> RAS+ world mm."""
    source: Path
    patient_id: str | None
    modality: str | None


def is_nifti(path: Path) -> bool:
    """Whether `path` is named like a NIfTI file."""
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def read_geometry(path: Path, slice_spacing_tolerance: float = 0.01,
                  max_volume_bytes: int = MAX_VOLUME_BYTES) -> Geometry:
    """Shape, spacing, affine and patient id of a volume from its headers only (all DICOM checks and the size
    check included)."""
    path = Path(path)
    if path.is_dir():
        return _DicomSeries(path, slice_spacing_tolerance, max_volume_bytes, with_pixels=False).geometry
    return _nifti(path, max_volume_bytes, with_pixels=False)[1]


def read_volume(path: Path, slice_spacing_tolerance: float = 0.01,
                max_volume_bytes: int = MAX_VOLUME_BYTES) -> Volume:
    """A NIfTI file or a DICOM series folder as float32 HU (slice, row, col); VolumeError names a bad file.

    `slice_spacing_tolerance` is the relative deviation allowed between consecutive DICOM slice gaps (and
    the relative in-plane drift per slice that counts as gantry tilt); NIfTI grids are regular by format.
    A volume whose headers claim more than `max_volume_bytes` (see the module docstring) is refused unread.
    """
    path = Path(path)
    if path.is_dir():
        series = _DicomSeries(path, slice_spacing_tolerance, max_volume_bytes, with_pixels=True)
        array, geometry = series.hu(), series.geometry
    else:
        array, geometry = _nifti(path, max_volume_bytes, with_pixels=True)
    _check_finite(array, path)
    log.debug("read %s: shape %s, spacing %s mm", path, array.shape, geometry.spacing)
    return Volume(array, geometry.spacing, geometry.affine, geometry.source, geometry.patient_id,
                  geometry.modality)


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN/Inf voxels at the door: later they would surface as NaN losses or metrics naming no file."""
    bad_per_slice = np.count_nonzero(~np.isfinite(array), axis=(1, 2))
    if bad_per_slice.any():
        slices = np.nonzero(bad_per_slice)[0]
        raise VolumeError(f"{path}: {int(bad_per_slice.sum())} NaN/Inf voxel(s) in {len(slices)} of {len(array)} "
                          f"slices (slice indices {slices[0]}..{slices[-1]}, inferior to superior)")


def _check_size(source: Path, claim: str, shape: tuple[int, ...], stored_bytes_per_voxel: int, stored_as: str,
                limit: int) -> None:
    """Refuse a volume whose headers claim more than `limit` bytes of voxels, before any of them is read."""
    needed = math.prod(shape) * (stored_bytes_per_voxel + FLOAT32_BYTES)
    if needed > limit:
        raise VolumeError(
            f"{source}: {claim} {' x '.join(str(n) for n in shape)} voxels of {stored_as}; reading them "
            f"takes {needed} bytes ({needed / 2**30:.1f} GiB: {stored_bytes_per_voxel} stored + {FLOAT32_BYTES} "
            f"as float32 per voxel), more than data.max_volume_bytes = {limit} ({limit / 2**30:.1f} GiB); "
            "nothing was read")


# --------------------------------------------------------------------------------------- orientation
def _slice_first(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The nibabel orientation transform to (S, P, L), the reoriented shape and the matching affine."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(SLICE_FIRST_AXCODES))
    new_shape = [0, 0, 0]
    for old_axis, (new_axis, _) in enumerate(transform):
        new_shape[int(new_axis)] = shape[old_axis]
    return transform, tuple(new_shape), affine @ inv_ornt_aff(transform, shape)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def _geometry(shape, affine, source, patient_id, modality) -> tuple[np.ndarray, Geometry]:
    transform, new_shape, new_affine = _slice_first(shape, affine)
    return transform, Geometry(new_shape, _spacing(new_affine), new_affine, source, patient_id, modality)


# --------------------------------------------------------------------------------------------- NIfTI
def _nifti(path: Path, max_volume_bytes: int, with_pixels: bool) -> tuple[np.ndarray | None, Geometry]:
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a volume (expected a DICOM series folder or a {'/'.join(NIFTI_SUFFIXES)} file)")
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable files; all mean the same here
        raise VolumeError(f"{path}: not a readable NIfTI file ({exc})") from exc
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {image.shape}")
    dtype = image.get_data_dtype()
    _check_size(path, "the header claims", shape, dtype.itemsize, str(dtype), max_volume_bytes)
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: affine is singular or not finite:\n{affine}")
    transform, geometry = _geometry(shape, affine, path, None, None)
    if not with_pixels:
        return None, geometry
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # truncated gzip streams surface as EOFError, zlib.error, OSError, ValueError
        raise VolumeError(f"{path}: voxel data cannot be read ({exc})") from exc
    return np.ascontiguousarray(apply_orientation(data, transform), dtype=np.float32), geometry


# --------------------------------------------------------------------------------------------- DICOM
def is_series_member(name: str) -> bool:
    """Whether a file named `name` in a DICOM series folder is read as part of the series."""
    return not name.startswith(".") and name.upper() != "DICOMDIR"


def dicom_series_files(folder: Path) -> list[Path]:
    """The files of a DICOM series folder that belong to the series (see the module docstring), sorted."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and is_series_member(p.name))
    if not files:
        raise VolumeError(f"{folder}: no DICOM files in this folder")
    return files


def _required(ds: pydicom.Dataset, path: Path, keyword: str):
    value = ds.get(keyword)
    if value is None or value == "":
        raise VolumeError(f"{path}: DICOM tag {keyword} is missing")
    return value


def _dcmread(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # truncation warnings: checked by the caller instead
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error...: all mean "not readable"
        raise VolumeError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


class _DicomSeries:
    """Headers of one DICOM series folder, checked and sorted along the slice normal."""

    def __init__(self, folder: Path, tolerance: float, max_volume_bytes: int, with_pixels: bool):
        self.folder = folder
        slices = [(path, self._read_header(path)) for path in dicom_series_files(folder)]
        self._check_claimed_size(slices, max_volume_bytes)
        if with_pixels:
            slices = [(path, self._read_pixels(path, header)) for path, header in slices]
        self._check_uniform(slices)
        self.slices, self.affine = self._sort_and_place(slices, tolerance)
        patient_ids = {str(ds.get("PatientID", "")).strip() for _, ds in self.slices} - {""}
        if len(patient_ids) > 1:
            raise VolumeError(f"{folder}: one series with several PatientIDs {sorted(patient_ids)}")
        tilts = sorted({float(ds.get("GantryDetectorTilt") or 0.0) for _, ds in self.slices} - {0.0})
        if tilts:
            # _sort_and_place refused positions off the slice normal, so the geometry that places every voxel is
            # untilted: the tag is metadata here (e.g. a scanner that resampled to an axial grid), not geometry.
            log.warning("%s: GantryDetectorTilt %s degrees, but the slice positions lie along the slice normal; "
                        "the series is read by its ImagePositionPatient/ImageOrientationPatient geometry",
                        folder, tilts)
        shape = (len(self.slices), int(self.slices[0][1].Rows), int(self.slices[0][1].Columns))
        self.transform, self.geometry = _geometry(shape, self.affine, folder,
                                                  patient_ids.pop() if patient_ids else None, "CT")

    @staticmethod
    def _read_header(path: Path) -> pydicom.Dataset:
        ds = _dcmread(path, stop_before_pixels=True)
        modality = ds.get("Modality")
        if modality != "CT":
            raise VolumeError(f"{path}: Modality is {modality!r}, only CT series are accepted")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise VolumeError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
                        "BitsAllocated", "RescaleSlope", "RescaleIntercept"):
            _required(ds, path, keyword)
        return ds

    def _check_claimed_size(self, headers: list[tuple[Path, pydicom.Dataset]], limit: int) -> None:
        """What the headers claim, at its largest (uniformity is checked later), must fit `limit`."""
        rows, cols, bits = (max(int(ds.get(keyword)) for _, ds in headers)
                            for keyword in ("Rows", "Columns", "BitsAllocated"))
        _check_size(self.folder, f"the headers of its {len(headers)} files claim", (len(headers), rows, cols),
                    math.ceil(bits / 8), f"{bits} bits", limit)

    @staticmethod
    def _read_pixels(path: Path, header: pydicom.Dataset) -> pydicom.Dataset:
        # A file cut inside its pixel data reads as an EMPTY dataset (pydicom only warns), so the headers are
        # read first, without pixels, and a full read that lost them means the pixel data is truncated.
        ds = _dcmread(path, stop_before_pixels=False)
        if "PixelData" not in ds or len(ds) <= len(header):
            raise VolumeError(f"{path}: truncated: the file ends inside its pixel data (or has none)")
        return ds

    def _check_uniform(self, slices: list[tuple[Path, pydicom.Dataset]]) -> None:
        series: dict[str, list[Path]] = {}
        for path, ds in slices:
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
        if len(series) > 1:
            listing = "; ".join(f"{uid or '<empty>'}: {len(paths)} files, e.g. {paths[0].name}"
                                for uid, paths in series.items())
            raise VolumeError(f"{self.folder}: holds {len(series)} series (SeriesInstanceUID {listing})")
        first_path, first = slices[0]
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        for path, ds in slices[1:]:
            if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation,
                               atol=ORIENTATION_ATOL):
                raise VolumeError(f"{path}: ImageOrientationPatient {list(ds.ImageOrientationPatient)} differs "
                                  f"from {list(first.ImageOrientationPatient)} in {first_path.name}")
            for keyword in ("Rows", "Columns", "PixelSpacing"):
                if list(np.atleast_1d(ds.get(keyword))) != list(np.atleast_1d(first.get(keyword))):
                    raise VolumeError(f"{path}: {keyword} {ds.get(keyword)} differs from "
                                      f"{first.get(keyword)} in {first_path.name}")

    def _sort_and_place(self, slices, tolerance: float):
        if len(slices) < 2:
            raise VolumeError(f"{slices[0][0]}: a series needs at least 2 slices to define a slice spacing")
        orientation = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
        row_cosine, col_cosine = orientation[:3], orientation[3:]
        normal = np.cross(row_cosine, col_cosine)
        normal /= np.linalg.norm(normal)
        positions = np.asarray([ds.ImagePositionPatient for _, ds in slices], dtype=np.float64)
        order = np.argsort(positions @ normal, kind="stable")
        slices = [slices[i] for i in order]
        positions = positions[order]
        steps = np.diff(positions, axis=0)
        gaps = steps @ normal
        names = [path.name for path, _ in slices]
        for i, gap in enumerate(gaps):
            if gap < DUPLICATE_POSITION_MM:
                raise VolumeError(f"{slices[i + 1][0]}: duplicate slice position {positions[i + 1].tolist()} "
                                  f"(same as {names[i]})")
        drift = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
        for i in np.nonzero(drift > tolerance * gaps)[0]:
            angle = np.degrees(np.arctan2(drift[i], gaps[i]))
            raise VolumeError(f"{slices[i + 1][0]}: slice positions are not along the slice normal "
                              f"({angle:.2f} degrees from it, e.g. gantry tilt; relative to {names[i]}); "
                              "tilted series are not supported")
        typical = float(np.median(gaps))
        for i in np.nonzero(np.abs(gaps - typical) > tolerance * typical)[0]:
            ratio = gaps[i] / typical
            what = (f"{round(ratio) - 1} missing slice(s)" if round(ratio) >= 2
                    and abs(ratio - round(ratio)) <= tolerance * round(ratio) else "irregular gap")
            raise VolumeError(f"{slices[i + 1][0]}: {what} between {names[i]} and {names[i + 1]} "
                              f"(gap {gaps[i]:.4g} mm, typical {typical:.4g} mm, tolerance {tolerance:g})")
        row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
        lps = np.eye(4)
        lps[:3, 0] = (positions[-1] - positions[0]) / (len(slices) - 1)
        lps[:3, 1] = col_cosine * row_spacing
        lps[:3, 2] = row_cosine * col_spacing
        lps[:3, 3] = positions[0]
        return slices, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    def hu(self) -> np.ndarray:
        """The voxels in HU (RescaleSlope/RescaleIntercept applied per file), reoriented to (S, P, L)."""
        rows, cols = int(self.slices[0][1].Rows), int(self.slices[0][1].Columns)
        stack = np.empty((len(self.slices), rows, cols), dtype=np.float32)
        for i, (path, ds) in enumerate(self.slices):
            try:
                pixels = ds.pixel_array
            except Exception as exc:  # decoder errors come as RuntimeError, ValueError, OSError...
                raise VolumeError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
            if pixels.shape != (rows, cols):
                raise VolumeError(f"{path}: pixel array has shape {pixels.shape}, Rows x Columns is {rows} x {cols}")
            stack[i] = pixels.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        return np.ascontiguousarray(apply_orientation(stack, self.transform), dtype=np.float32)
