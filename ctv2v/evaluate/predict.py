"""Apply a trained model to a new thick CT series: the thin series as NIfTI (and optionally as a DICOM series).

The whole volume goes through the same tiled sampler as evaluation (ctv2v.evaluate.evaluate.predict_volume):
overlapping tiles, blended with smooth weights, every thin slice from the first to the last thick slice
interpolated. Sampling runs under fp16 autocast on CUDA and in fp32 on CPU (ctv2v.device.Precision).

Geometry: the input is read by ctv2v.data.readers (slice axis first, RAS+ affine). Thin slice 0 lies on thick
slice 0, so the output keeps the input's origin and orientation; only the slice step shrinks by the factor k:
thin affine column 0 = thick affine column 0 / k. The output has (n_thick - 1) * k + 1 slices.

The model's grid: a model trained on one in-plane pixel spacing (data.resample.pixel_mm, recorded with the rest of
its config in model.json) runs on that spacing: the input is resampled in-plane to it, predicted there, brought back
to the input's pixels, then projected onto the measured thick series (evaluation.data_consistency). The output
records the grid the model ran on (model_grid_mm in the summary, the NIfTI descrip, DICOM ImageComments).

What the model accepts: a CT in HU (a DICOM series whose Modality is not CT is refused by the reader; a NIfTI
whose values hold no air, i.e. nothing at or below AIR_MAX_HU, is not a CT in HU) with a slice spacing that fits
the thick spacing the model was trained on (model.json `thick_spacing_mm`, within THICK_SPACING_TOLERANCE).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctv2v.config import ResampleConfig, RunConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.data.interpolation import Interpolation, covered_slices
from ctv2v.data.readers import Volume, dicom_series_files, read_volume
from ctv2v.data.thick import ThickSeries, project_to_thick, resample_spacing
from ctv2v.device import Precision, resolve_precision, select_device
from ctv2v.evaluate.adapt import Adaptation, adapt_to_scan
from ctv2v.evaluate.evaluate import predict_volume, write_prediction_nifti
from ctv2v.files import check_creatable, check_output_folder, output_set, record_created
from ctv2v.models.artifacts import load_model_for_inference, read_model_meta
from ctv2v.models.weights import CheckpointError

log = logging.getLogger(__name__)

THICK_SPACING_TOLERANCE = 0.25
"""How far (relative) an input's slice spacing may lie outside the training range: protocols round spacings
(2.5 vs 3 mm), but a model trained on 5 mm slabs asked to fill 1 mm gaps would invent structure."""
AIR_MAX_HU = -500.0
"""A CT in HU holds air (about -1000 HU) around the body or in the lungs; a volume without any value at or
below this is not a CT in HU (MR, a label map, or CT stored without its rescale)."""
SERIES_DESCRIPTION = "ctv2v synthesized thin slices"


class PredictionError(ValueError):
    """The input cannot be turned into thin slices by this model; the message names the file and the value."""


@dataclass(frozen=True)
class ThinSeries:
    """A predicted thin series: (slice, row, col) HU and the affine of its voxel grid (RAS+ mm)."""

    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    factor: int
    model_grid_mm: tuple[float, float, float]
    """The (slice, row, col) spacing the model ran at: the thin slice spacing and data.resample.pixel_mm in-plane
    (the input's pixels when the model was trained on each scan's own)."""

    adapted_seconds: float = 0.0
    """Test-time adaptation to this scan (`predict --adapt`; 0: the model as trained)."""

    def describe(self) -> str:
        """Where the series comes from, for the file's own description (NIfTI descrip, DICOM ImageComments)."""
        adapted = f", adapted to this scan for {self.adapted_seconds:g} s" if self.adapted_seconds > 0 else ""
        return f"ctv2v x{self.factor}, model grid {'x'.join(f'{mm:g}' for mm in self.model_grid_mm)} mm{adapted}"


class Predictor:
    """A trained model ready to turn thick series into thin ones (sampling seeded with the model's config seed)."""

    def __init__(self, model_dir: Path, device: str = "auto", adapt_seconds: float = 0.0):
        """`adapt_seconds` > 0: before each prediction, a copy of the denoiser fine-tunes on the scan's in-plane
        axes for at most that long (ctv2v.evaluate.adapt); `adaptation` then says how it went."""
        if adapt_seconds < 0:
            raise PredictionError(f"--adapt {adapt_seconds:g}: a time budget in seconds, 0 or more")
        self.adapt_seconds = adapt_seconds
        self.adaptation: Adaptation | None = None
        model_dir = Path(model_dir)
        meta = read_model_meta(model_dir)
        self.config = RunConfig.model_validate(meta["config"])
        if "thick_spacing_mm" not in meta:
            raise CheckpointError(f"{model_dir}/model.json records no thick_spacing_mm (the thick slice spacings "
                                  "the model was trained on); it was saved before they were recorded: retrain it")
        self.thick_spacing_mm = tuple(float(value) for value in meta["thick_spacing_mm"])
        self.model_dir = model_dir
        self.device = select_device(device)
        self.precision: Precision = resolve_precision(self.config.training.precision, self.device)
        self.model = load_model_for_inference(model_dir, self.config, self.device)
        self.weights_label: str = self.model.vae.weights_label

    @property
    def factor(self) -> int:
        """Thin slices per thick slice, as trained."""
        return self.config.data.thick.factor

    def check_input(self, hu: np.ndarray, spacing: tuple[float, float, float], source: str,
                    factor: int | None = None) -> int:
        """The factor to use; PredictionError naming `source` if the series does not fit the model."""
        factor = self.factor if factor is None else factor
        if factor != self.factor:
            raise PredictionError(f"--factor {factor}: this model was trained to put {self.factor} thin slices on "
                                  f"each thick slice; it cannot do x{factor}")
        if hu.ndim != 3 or hu.shape[0] < 2:
            raise PredictionError(f"{source}: expected a (slice, row, col) volume with at least 2 slices, "
                                  f"got shape {hu.shape}")
        if not np.isfinite(hu).all():
            raise PredictionError(f"{source}: {int((~np.isfinite(hu)).sum())} voxels are NaN or infinite")
        if hu.min() > AIR_MAX_HU:
            raise PredictionError(f"{source}: lowest value {hu.min():g}; a CT in HU holds air (about -1000 HU) at "
                                  f"or below {AIR_MAX_HU:g}: this is not a CT in HU")
        low, high = self.thick_spacing_mm
        spacing_mm = float(spacing[0])
        if not low / (1 + THICK_SPACING_TOLERANCE) <= spacing_mm <= high * (1 + THICK_SPACING_TOLERANCE):
            raise PredictionError(
                f"{source}: slice spacing {spacing_mm:g} mm does not fit this model, trained on thick slices "
                f"{low:g}-{high:g} mm apart (x{self.factor} of the thin spacing; tolerance "
                f"{THICK_SPACING_TOLERANCE:.0%})")
        return factor

    @property
    def pixel_mm(self) -> float | None:
        """The in-plane pixel spacing the model was trained on (data.resample.pixel_mm); None: each scan's own."""
        return self.config.data.resample.pixel_mm

    def model_grid(self, spacing: tuple[float, float, float]) -> tuple[float, float] | None:
        """The in-plane (row, column) spacing the model runs at for an input of `spacing`; None: the input's own."""
        if self.pixel_mm is None or all(abs(float(s) - self.pixel_mm) <= 1e-6 * self.pixel_mm for s in spacing[1:]):
            return None
        return self.pixel_mm, self.pixel_mm

    def predict_on_model_grid(self, hu: np.ndarray, spacing: tuple[float, float, float], source: str = "input"
                              ) -> tuple[np.ndarray, ThickSeries]:
        """(the model's blended thin series in HU, the thick series it read), both on the model's in-plane grid.

        The input is resampled in-plane to data.resample.pixel_mm (box weights, as training data were); no data
        consistency yet.
        """
        hu = np.ascontiguousarray(hu, dtype=np.float32)
        if self.model_grid(spacing) is not None:
            hu, spacing, _ = resample_spacing(hu, spacing, np.eye(4), ResampleConfig(pixel_mm=self.pixel_mm))
        _, rows, cols = hu.shape
        thick = ThickSeries(hu, self.factor, float(spacing[0]), float(spacing[0]), "input series")
        thin_spacing = (float(spacing[0]) / self.factor, float(spacing[1]), float(spacing[2]))
        # predict_volume reads only the thin grid's shape and the thick series: no thin truth exists here, so a
        # broadcast array (no memory) stands for the thin grid.
        grid = np.broadcast_to(np.float32(self.config.data.intensity.hu_min), (covered_slices(thick), rows, cols))
        volume = Preprocessed(Path(source).name, grid, thick, thin_spacing, np.diag([*thin_spacing, 1.0]))
        model = self.model
        if self.adapt_seconds > 0:
            # Adaptation trains on the model's own thin series of this scan (ctv2v.evaluate.adapt).
            with self.precision.autocast(self.device):
                own = predict_volume(self.model, volume, self.config, self._generator())
            if self.config.evaluation.data_consistency:
                own = project_to_thick(own, thick, own.shape[0])
            model, self.adaptation = adapt_to_scan(self.model, volume, own, self.config, self.device,
                                                   self.adapt_seconds)
        with self.precision.autocast(self.device):
            return predict_volume(model, volume, self.config, self._generator()), thick

    def _generator(self) -> torch.Generator:
        """The sampler's random stream, seeded with the run's seed: a prediction does not depend on what ran
        before it."""
        return torch.Generator(device=self.device).manual_seed(self.config.seed)

    def predict(self, hu: np.ndarray, spacing: tuple[float, float, float], affine: np.ndarray | None = None,
                source: str = "input", factor: int | None = None) -> ThinSeries:
        """The thin series of a thick (slice, row, col) HU volume with (slice, row, col) `spacing` in mm.

        The model runs on its own in-plane grid (model_grid); its result comes back to the input's pixels as the
        upsampled prediction plus the in-plane detail finer than the model's pixels, which the interpolation it
        starts from (v2v.interpolation) holds at the input's pixels. Then, with evaluation.data_consistency, the
        thin series is projected onto the measured thick series on the output grid.
        """
        hu = np.ascontiguousarray(hu, dtype=np.float32)
        factor = self.check_input(hu, spacing, source, factor)
        if affine is None:
            affine = np.diag([*(float(s) for s in spacing), 1.0])
        thin_affine = np.asarray(affine, dtype=np.float64).copy()
        thin_affine[:3, 0] /= factor
        thin_spacing = (float(spacing[0]) / factor, float(spacing[1]), float(spacing[2]))
        thin, model_thick = self.predict_on_model_grid(hu, spacing, source)
        thick = ThickSeries(hu, factor, float(spacing[0]), float(spacing[0]), "input series")
        grid = self.model_grid(spacing)
        if grid is not None:
            interpolation = Interpolation(self.config.v2v.interpolation, self.config.v2v.consistent_interpolation)
            detail = _interpolated(interpolation, thick) - upsample_in_plane(
                _interpolated(interpolation, model_thick), hu.shape[1:], grid, spacing[1:])
            thin = upsample_in_plane(thin, hu.shape[1:], grid, spacing[1:]) + detail
        if self.config.evaluation.data_consistency:
            thin = project_to_thick(thin, thick, thin.shape[0])
        return ThinSeries(thin.astype(np.float32), thin_affine, thin_spacing, factor,
                          (thin_spacing[0], *(grid or thin_spacing[1:])), self.adapt_seconds)


def upsample_in_plane(volume: np.ndarray, shape: tuple[int, int], spacing: tuple[float, float],
                      new_spacing: tuple[float, float]) -> np.ndarray:
    """A (slice, row, col) volume on a grid of `spacing` brought to `shape` pixels of `new_spacing` by linear
    interpolation (constant beyond the outermost pixel centres).

    Both grids start at the same edge, as ctv2v.data.thick.resample_spacing makes them: pixel i's centre lies at
    (i + 1/2) x spacing.
    """
    out = volume.astype(np.float32)
    for axis, (n_new, old_mm, new_mm) in enumerate(zip(shape, spacing, new_spacing), start=1):
        positions = (np.arange(n_new) + 0.5) * new_mm / old_mm - 0.5
        low = np.clip(np.floor(positions).astype(int), 0, out.shape[axis] - 1)
        high = np.minimum(low + 1, out.shape[axis] - 1)
        along = [1, 1, 1]
        along[axis] = n_new
        fraction = np.clip(positions - low, 0.0, 1.0).astype(np.float32).reshape(along)
        out = np.take(out, low, axis=axis) * (1 - fraction) + np.take(out, high, axis=axis) * fraction
    return out


def _interpolated(interpolation: Interpolation, thick: ThickSeries) -> np.ndarray:
    """`interpolation` of a thick series on its covered thin slices, in HU."""
    covered = covered_slices(thick)
    grid = np.broadcast_to(np.float32(0), (covered, *thick.array.shape[1:]))
    return interpolation.of(Preprocessed("interpolation", grid, thick, (1.0, 1.0, 1.0), np.eye(4)))


def check_outputs(input_path: Path, out: Path, out_dicom: Path | None = None, overwrite: bool = False) -> None:
    """Before any compute, changing nothing: refuse outputs that cannot be written, exist without `overwrite`, or
    would write over or into the input (even with `overwrite`)."""
    input_path, out = Path(input_path), Path(out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise PredictionError(f"--out {out}: expected a .nii or .nii.gz file name")
    if out.is_dir():
        raise PredictionError(f"--out {out}: is a folder; give a .nii or .nii.gz file name")
    _check_not_the_input("--out", out, input_path)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise PredictionError(f"--out {out}: exists; pass --overwrite to replace it")
    check_creatable(out)
    if out_dicom is None:
        return
    out_dicom = Path(out_dicom)
    if out_dicom.is_symlink() or (out_dicom.exists() and not out_dicom.is_dir()):
        raise PredictionError(f"--out-dicom {out_dicom}: exists and is not a folder (a file or a link); give a new "
                              "folder")
    _check_not_the_input("--out-dicom", out_dicom, input_path)
    if out.absolute().is_relative_to(out_dicom.absolute()) or out.resolve().is_relative_to(out_dicom.resolve()):
        raise PredictionError(f"--out {out} lies inside --out-dicom {out_dicom}: give them apart")
    if out_dicom.is_dir() and any(out_dicom.iterdir()):
        if not overwrite:
            raise PredictionError(f"--out-dicom {out_dicom}: folder exists and is not empty; pass --overwrite to "
                                  "replace a series ctv2v wrote there, or give a new folder")
        check_output_folder(out_dicom, replace=True)  # only a series ctv2v wrote, holding nothing else
    check_creatable(out_dicom)


def _check_not_the_input(flag: str, path: Path, input_path: Path) -> None:
    """Refuse an output that is, holds or lies inside the input (a NIfTI file, or a DICOM folder and its files),
    compared by resolved path and by inode (hard links, bind mounts)."""
    resolved, source = path.resolve(), input_path.resolve()
    same_inode = path.exists() and input_path.exists() and os.path.samefile(path, input_path)
    overlaps = resolved == source or source.is_relative_to(resolved) or (source.is_dir()
                                                                         and resolved.is_relative_to(source))
    input_file = path.is_file() and source.is_dir() and any(
        os.path.samefile(path, member) for member in source.iterdir() if member.is_file())
    if same_inode or overlaps or input_file:
        raise PredictionError(f"{flag} {path}: would write over or into the input {input_path}; ctv2v never does, "
                              "not even with --overwrite")


def predict_file(predictor: Predictor, input_path: Path, out: Path, out_dicom: Path | None = None,
                 factor: int | None = None, overwrite: bool = False) -> dict:
    """Read a thick NIfTI file or DICOM series folder, write the thin NIfTI (and DICOM series) as one set (neither
    appears unless both are written); a summary dict. Outputs are checked first (check_outputs)."""
    input_path, out = Path(input_path), Path(out)
    check_outputs(input_path, out, out_dicom, overwrite)
    volume = read_volume(input_path, max_volume_bytes=predictor.config.data.max_volume_bytes)  # the model's limit
    thin = predictor.predict(volume.array, volume.spacing, volume.affine, source=str(input_path), factor=factor)
    summary = {"input": str(input_path), "input_shape": list(volume.array.shape),
               "input_spacing_mm": list(volume.spacing), "factor": thin.factor,
               "output": str(out), "output_shape": list(thin.hu.shape), "output_spacing_mm": list(thin.spacing),
               "model_grid_mm": list(thin.model_grid_mm),
               "adaptation": predictor.adaptation.to_dict() if predictor.adaptation is not None else None,
               "weights": predictor.weights_label, "sample_steps": predictor.config.evaluation_sample_steps}
    with output_set([out, *([Path(out_dicom)] if out_dicom is not None else [])]) as staged:
        write_prediction_nifti(staged[0], thin.hu, thin.affine, thin.describe())
        if out_dicom is not None:
            summary.update({"output_dicom": str(out_dicom),
                            "series_instance_uid": write_dicom_series(staged[1], thin, volume)})
    log.info("thin series %s -> %s", volume.array.shape, thin.hu.shape)
    return summary


# ------------------------------------------------------------------------------------------------ DICOM
def _template(volume: Volume) -> pydicom.Dataset | None:
    """The first file of a DICOM input, whose patient and study the new series joins; None for NIfTI."""
    if not Path(volume.source).is_dir():
        return None
    return pydicom.dcmread(dicom_series_files(Path(volume.source))[0], stop_before_pixels=True)


def write_dicom_series(out_dir: Path, thin: ThinSeries, source: Volume) -> str:
    """Write `thin` as a new CT series (one file per slice) in the source's study into the new folder `out_dir`,
    marked as ctv2v's (a later --overwrite may replace it); returns its SeriesInstanceUID.

    Positions follow the thin affine: slice s lies at ImagePositionPatient = affine @ (s, 0, 0) (in LPS), rows
    and columns run along affine columns 1 and 2.
    """
    template = _template(source)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ thin.affine
    row_spacing, col_spacing = (float(np.linalg.norm(lps[:3, axis])) for axis in (1, 2))
    # DICOM's ImageOrientationPatient: the direction along a row (increasing column) first, then down a column.
    orientation = [*(lps[:3, 2] / col_spacing), *(lps[:3, 1] / row_spacing)]
    series_uid = generate_uid()
    now = datetime.datetime.now(datetime.UTC)
    study_uid = template.StudyInstanceUID if template is not None else generate_uid()
    frame_uid = template.get("FrameOfReferenceUID", None) if template is not None else None
    frame_uid = frame_uid or generate_uid()
    pixels = np.clip(np.rint(thin.hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    out_dir = Path(out_dir)
    out_dir.mkdir()
    for index in range(pixels.shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "StudyID", "AccessionNumber", "ReferringPhysicianName"):
            if template is not None and keyword in template:
                setattr(ds, keyword, template.get(keyword))
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = f"{SERIES_DESCRIPTION} x{thin.factor}"
        ds.ImageComments = thin.describe()
        ds.SeriesNumber = 9000 + thin.factor
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ [index, 0, 0] + lps[:3, 3]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [row_spacing, col_spacing]
        ds.SliceThickness = thin.spacing[0]
        ds.SpacingBetweenSlices = thin.spacing[0]
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = pixels[index].tobytes()
        ds.save_as(out_dir / f"CT.{series_uid}.{index + 1:04d}.dcm", enforce_file_format=True)
    record_created(out_dir)
    return series_uid
