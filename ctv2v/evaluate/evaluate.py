"""Test-set evaluation: whole volumes through overlapping tiles, scored in HU next to the interpolation baselines.

Each test volume's thick series is cut into overlapping tiles (plan_tiles: evaluation.tile_*, by default whole
slices where the model has no attention and memory allows, as many per model call as fit); the model samples the
thin clip of each, and the clips are blended back with smooth weights (a sine bump per axis,
highest in a tile's centre, so no seam shows where tiles meet). Along z a tile's weight is zero after its last
real thick slice: those frames would be extrapolated from one side only, and the tile that holds the next
thick slice interpolates them instead. Every thin slice from the first to the last thick position is
therefore covered by interpolating tiles only; the slices after the last thick position are not predicted
and not scored (the baselines are scored on the same covered range, ctv2v.data.interpolation). The model sees the
thick series clipped to its input window (data.intensity, ctv2v.intensity) while the baselines interpolate
raw HU; both are clipped to the evaluation window before scoring.

Per volume the step writes the prediction as NIfTI (the thin volume's own affine: same origin, orientation
and thin spacing), a PNG panel (ctv2v.evaluate.panels) and its scores; `report.json` holds them all with the mean over
volumes, every setting that moves the numbers (HU window, thick-slice method, sampling steps, weights) and
the metric glossary; it is written and read with ctv2v.evaluate.metrics' JSON policy (infinite PSNR as "inf").
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import psutil
import torch
from monai.networks.blocks import CrossAttentionBlock, SABlock
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary
from tqdm import tqdm

from ctv2v.config import RunConfig
from ctv2v.data.cache import Preprocessed, PreprocessCache
from ctv2v.data.interpolation import Interpolation, covered_slices, interpolate
from ctv2v.data.clips import Tile, covering_tiles, extract_clip
from ctv2v.data.thick import project_to_thick
from ctv2v.files import atomic_path, atomic_write_text
from ctv2v.intensity import Intensity
from ctv2v.evaluate.metrics import METRIC_NAMES, SLICE_SETS, from_json, glossary, score_volume, to_json
from ctv2v.evaluate.panels import render_panel, write_panel
from ctv2v.evaluate.adapt import adapt_to_scan
from ctv2v.evaluate.baseline_report import score_baselines
from ctv2v.models.weights import weights_display, weights_kind

log = logging.getLogger(__name__)

REPORT_SCHEMA = "ctv2v.evaluation/1"
REPORT_FILE = "report.json"
PREDICTIONS_DIR = "predictions"
PANELS_DIR = "panels"
MODEL = "model"
"""The method name of the model among the scored methods (the others are baseline names)."""
MODEL_ADAPTED = "model+adapt"
"""The model after test-time adaptation to each scan (evaluation.adapt), scored beside the model itself."""
LEARNED_METHODS = (MODEL, MODEL_ADAPTED)
STAND_IN_WARNING = ("STAND-IN WEIGHTS: the VAE holds random values in MAISI's layout, not MAISI's published "
                    "weights; these numbers say nothing about the pretrained VAE")


class EvaluationError(ValueError):
    """The model or the data cannot be evaluated as asked; the message names the volume, tile or key."""


class ClipSampler(Protocol):
    """What evaluation needs of a model: thick clip (B, 1, T/k, H, W) in [0, 1] -> thin clip (B, 1, T, H, W).

    `interpolation` is the interpolation whose clips `sample` needs as `interp` (None: unused).
    """

    interpolation: Interpolation | None

    def eval(self) -> Any: ...

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None,
               interp: torch.Tensor | None = None) -> torch.Tensor: ...


Scores = dict[str, dict[str, dict[str, float]]]
"""Method (MODEL or a baseline name) -> slice set (SLICE_SETS) -> metric (METRIC_NAMES) -> value."""


@dataclass
class VolumeResult:
    """One test volume's entry in the report: its geometry, thick series, scores and written files."""

    id: str
    thin_shape: list[int]
    spacing_mm: list[float]
    thick_description: str
    n_thick: int
    scored_slices: int
    metrics: Scores
    prediction_nifti: str | None = None
    """Path relative to the evaluation folder; None when evaluation.write_nifti is off."""
    panel_png: str = ""
    """Path relative to the evaluation folder."""
    adaptation: dict[str, float] | None = None
    """How test-time adaptation went on this volume (ctv2v.evaluate.adapt.Adaptation); None when it was off."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (no `prediction_nifti` / `adaptation` key when none was written / done)."""
        data = asdict(self)
        for optional in ("prediction_nifti", "adaptation"):
            if data[optional] is None:
                del data[optional]
        return data


@dataclass
class EvaluationReport:
    """report.json: the scores of the model and the baselines, and every setting that moves them.

    The JSON form also spells out what follows from the fields (weights kind and display text, volume count and
    ids, the stand-in warning) for readers of the file; `from_dict` recomputes them and refuses a contradiction.
    """

    variant: str
    weights_label: str
    manifest_sha256: str
    hu_range: list[float]
    model_intensity_window: list[float]
    thick: dict[str, Any]
    """data.thick: method, factor, thickness_mm."""
    sample_steps: int
    seed: int
    tiles: dict[str, Any]
    """The evaluation.tile_* settings (`auto` ones are resolved per volume and logged) and data.clip's crop."""
    test_volumes_in_split: int
    baselines: list[str]
    scored_range: str
    slice_sets: dict[str, str]
    metrics: dict[str, str]
    aggregate_over: str
    aggregate: Scores
    """The mean over volumes of each volume's scores."""
    volumes: list[VolumeResult] = field(default_factory=list)
    model_settings: dict[str, Any] = field(default_factory=dict)
    """What else moves the model's numbers: data.resample, diffusion, v2v, evaluation.data_consistency."""
    split: str = "test"
    schema: str = REPORT_SCHEMA

    @property
    def weights(self) -> str:
        return weights_kind(self.weights_label)

    @property
    def weights_display(self) -> str:
        return weights_display(self.weights_label)

    @property
    def n_volumes(self) -> int:
        return len(self.volumes)

    @property
    def volume_ids(self) -> list[str]:
        return [volume.id for volume in self.volumes]

    @property
    def warning(self) -> str | None:
        return STAND_IN_WARNING if self.weights == "stand-in" else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, fields and derived values in reading order."""
        data: dict[str, Any] = {
            "schema": self.schema, "variant": self.variant, "weights": self.weights,
            "weights_label": self.weights_label, "weights_display": self.weights_display,
            "manifest_sha256": self.manifest_sha256, "hu_range": self.hu_range,
            "model_intensity_window": self.model_intensity_window, "thick": self.thick,
            "sample_steps": self.sample_steps, "seed": self.seed, "tiles": self.tiles, "split": self.split,
            "test_volumes_in_split": self.test_volumes_in_split, "n_volumes": self.n_volumes,
            "volume_ids": self.volume_ids, "baselines": self.baselines, "scored_range": self.scored_range,
            "slice_sets": self.slice_sets, "metrics": self.metrics, "aggregate_over": self.aggregate_over,
            "aggregate": self.aggregate, "model_settings": self.model_settings,
            "volumes": [volume.to_dict() for volume in self.volumes],
        }
        if self.warning is not None:
            data["warning"] = self.warning
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluationReport":
        """Inverse of to_dict; a missing field, an unknown key or a contradicting derived value is a ValueError."""
        if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an evaluation report (schema {found!r}, expected {REPORT_SCHEMA!r})")
        names = {f.name for f in fields(cls)}
        derived = {"weights", "weights_display", "n_volumes", "volume_ids", "warning"}
        unknown, missing = sorted(set(data) - names - derived), sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"evaluation report: unknown key(s) {unknown}, missing key(s) {missing}")
        try:
            volumes = [VolumeResult(**volume) for volume in data["volumes"]]
            report = cls(**{**{name: data[name] for name in names}, "volumes": volumes})
            recomputed = report.to_dict()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"evaluation report: {exc}") from exc
        contradicted = sorted(key for key in derived if data.get(key) != recomputed.get(key))
        if contradicted:
            raise ValueError(f"evaluation report: {contradicted} contradict the rest of the report")
        return report

    def write(self, path: Path) -> Path:
        """Write the JSON form atomically (ctv2v.evaluate.metrics' JSON policy)."""
        atomic_write_text(Path(path), to_json(self.to_dict()))
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> "EvaluationReport":
        """The report in `path`; a file that is not one is a ValueError naming it."""
        path = Path(path)
        try:
            return cls.from_dict(from_json(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def manifest_sha256(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON: reports made from different manifests get different hashes."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def evaluation_entries(manifest: dict, max_volumes: int | None, volume_ids: list[str] | None = None) -> list[dict]:
    """The manifest's test-split entries in manifest order (only `volume_ids` when given), at most `max_volumes`."""
    entries = [entry for entry in manifest["volumes"] if entry["split"] == "test"]
    if not entries:
        raise EvaluationError("the manifest has no volume in the 'test' split")
    if volume_ids is not None:
        unknown = sorted(set(volume_ids) - {entry["id"] for entry in entries})
        if unknown:
            raise EvaluationError(f"evaluation.volume_ids {unknown} are not in the test split "
                                  f"({[entry['id'] for entry in entries]})")
        entries = [entry for entry in entries if entry["id"] in volume_ids]
    return entries if max_volumes is None else entries[:max_volumes]


# ------------------------------------------------------------------------------------------- blending
def _bump(n: int) -> np.ndarray:
    """A sine bump over n samples: positive everywhere, 1 in the middle, small at both ends."""
    return np.sin(np.pi * (np.arange(n) + 0.5) / n)


def tile_weights(tile: Tile, n_thick: int) -> np.ndarray:
    """(frames, height, width) blending weights of a tile; zero along z after the tile's last real thick slice."""
    real_thick = min(tile.thick_frames, n_thick - tile.thick_start)
    if real_thick < 2:
        raise EvaluationError(f"tile at z0={tile.z0} holds {real_thick} thick slice(s); interpolation needs 2")
    span = (real_thick - 1) * tile.factor + 1
    along_z = np.zeros(tile.frames)
    along_z[:span] = _bump(span)
    return (along_z[:, None, None] * _bump(tile.height)[None, :, None] * _bump(tile.width)[None, None, :]).astype(
        np.float32)


def clip_to_hu(clip: np.ndarray, intensity: Intensity) -> np.ndarray:
    """A sampled thin clip in HU: the model's output range is the intensity window it was trained on, [0, 1]."""
    return intensity.to_hu(np.clip(clip, 0.0, 1.0))


# ------------------------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class TilePlan:
    """How a volume is cut for the model: tile size and strides (thin slices, rows, columns), tiles per call."""

    size: tuple[int, int, int]
    strides: tuple[int, int, int]
    batch_size: int
    tile_peak_bytes: int | None = None
    """The measured peak memory of one tile through model.sample (None: every setting fixed, nothing measured)."""
    budget_bytes: int | None = None
    """The memory one tile batch may use (evaluation.tile_memory_share of the memory available)."""

    def describe(self) -> str:
        """One line for the log: sizes, strides, batch and memory."""
        text = (f"tiles {'x'.join(map(str, self.size))} (thin slices x rows x columns), strides "
                f"{'/'.join(map(str, self.strides))}, {self.batch_size} per model call")
        if self.tile_peak_bytes is not None and self.budget_bytes is not None:
            text += (f", {self.batch_size * self.tile_peak_bytes / 2**20:.0f} MiB per call of a "
                     f"{self.budget_bytes / 2**20:.0f} MiB budget")
        return text


class _PeakTensorBytes(TorchDispatchMode):
    """The peak bytes of tensor storage created under this mode and alive at once (weights and inputs made before
    it are not counted): what one model call needs beyond the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self._tracked:
                    self._tracked[storage] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def tile_peak_bytes(model: ClipSampler, config: RunConfig, size: tuple[int, int, int], device: torch.device) -> int:
    """The peak memory of one tile of `size` through model.sample, measured on a blank tile."""
    frames, height, width = size
    factor = config.data.thick.factor
    thick = torch.zeros((1, 1, frames // factor, height, width), device=device)
    inputs = {"interp": torch.zeros((1, 1, frames, height, width), device=device)
              } if model.interpolation is not None else {}
    tracker = _PeakTensorBytes()
    with torch.inference_mode(), tracker:
        model.sample(thick, steps=config.evaluation_sample_steps, generator=None, **inputs)
    return tracker.peak


CGROUP_MEMORY = Path("/sys/fs/cgroup")
"""cgroup v2's memory files of this process's container: a pod's memory limit is not in the host's free RAM."""


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free memory; on CPU the RAM available to new allocations, within the
    container's memory limit (cgroup v2 memory.max - memory.current) when it has one."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = int(psutil.virtual_memory().available)
    limit_file, current_file = CGROUP_MEMORY / "memory.max", CGROUP_MEMORY / "memory.current"
    if limit_file.is_file() and current_file.is_file():
        limit = limit_file.read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(current_file.read_text().strip()))
    return max(available, 0)


def attends(model: ClipSampler) -> bool:
    """Whether a layer of `model` attends over positions: its output at a voxel then depends on the whole tile."""
    return isinstance(model, torch.nn.Module) and any(
        isinstance(module, (SABlock, CrossAttentionBlock, torch.nn.MultiheadAttention)) for module in model.modules())


def plan_tiles(model: ClipSampler, config: RunConfig, shape: tuple[int, int, int], factor: int,
               device: torch.device, n_thick: int | None = None) -> TilePlan:
    """The tiles for a thin volume of `shape` (evaluation.tile_*): fixed settings as given, `auto` ones from memory.

    Auto in-plane sizes: for a model without attention, the whole slice where one tile of it fits the memory
    budget, else halved (never below data.clip's crop) until it fits; a model with attention (MONAI's
    DiffusionModelUNet always has it in its middle block) keeps the training crop, because attention makes every
    output voxel depend on the whole tile and its cost grows with the square of the tile's voxels. The auto batch
    is as many tiles as the budget holds. Memory per tile is measured on one blank tile of the training crop and
    scaled by voxels (exact for the crop itself; linear in voxels without attention).
    """
    settings, clip = config.evaluation, config.data.clip
    frames = clip.frames if settings.tile_frames == "auto" else settings.tile_frames
    if frames % factor or frames < 2 * factor:
        raise EvaluationError(f"evaluation.tile_frames={frames} must be a multiple of the thick factor {factor} and "
                              f"hold at least 2 thick slices ({2 * factor} thin slices)")
    _, rows, cols = shape
    whole = not attends(model)
    auto_height, auto_width = settings.tile_height == "auto", settings.tile_width == "auto"
    height = (rows if whole else clip.height) if auto_height else settings.tile_height
    width = (cols if whole else clip.width) if auto_width else settings.tile_width
    peak = budget = None
    if auto_height or auto_width or settings.tile_batch_size == "auto":
        budget = int(available_memory_bytes(device) * settings.tile_memory_share)
        crop = (frames, clip.height, clip.width)
        per_voxel = tile_peak_bytes(model, config, crop, device) / math.prod(crop)
        while per_voxel * frames * height * width > budget and (
                (auto_height and height > clip.height) or (auto_width and width > clip.width)):
            height = max(clip.height, -(-height // 2)) if auto_height else height
            width = max(clip.width, -(-width // 2)) if auto_width else width
        peak = int(per_voxel * frames * height * width)
    batch = max(1, budget // max(peak, 1)) if settings.tile_batch_size == "auto" else settings.tile_batch_size
    overlap = settings.tile_overlap
    in_plane = clip.eval_overlap if overlap == "auto" else overlap
    # Along z a tile's weight ends at its last thick slice, so neighbours must share at least one thick slice.
    most = frames - factor
    z_stride = most if overlap == "auto" else min(most, max(factor, int(frames * (1 - overlap)) // factor * factor))
    strides = (z_stride, max(1, int(height * (1 - in_plane))), max(1, int(width * (1 - in_plane))))
    n_tiles = len(covering_tiles(shape, (frames, height, width), strides, factor, n_thick))
    return TilePlan((frames, height, width), strides, min(batch, n_tiles), peak, budget)


def predict_volume(
    model: ClipSampler,
    volume: Preprocessed,
    config: RunConfig,
    generator: torch.Generator,
    plan: TilePlan | None = None,
) -> np.ndarray:
    """The model's thin series in HU over the covered range (thin slices 0..(n_thick-1)*k), blended from tiles.

    `plan` defaults to plan_tiles for this volume (evaluation.tile_*).
    """
    intensity = Intensity.from_config(config.data.intensity)
    thick = volume.thick
    n_thick = thick.array.shape[0]
    covered = covered_slices(thick)
    rows, cols = volume.thin.shape[1:]
    device = generator.device
    if plan is None:
        plan = plan_tiles(model, config, volume.thin.shape, thick.factor, device, n_thick)
    log.info("%s: %s", volume.volume_id, plan.describe())
    tiles = covering_tiles(volume.thin.shape, plan.size, plan.strides, thick.factor, n_thick)
    frames, height, width = plan.size
    total = np.zeros((covered, rows, cols), dtype=np.float32)
    weight_sum = np.zeros_like(total)
    interpolated = model.interpolation.of(volume) if model.interpolation is not None else None
    for start in tqdm(range(0, len(tiles), plan.batch_size), desc=f"evaluate {volume.volume_id}", unit="batch",
                      leave=False):
        batch = tiles[start:start + plan.batch_size]
        arrays = [extract_clip(volume, tile, intensity, interpolated) for tile in batch]
        clips = np.stack([a["thick"] for a in arrays])[:, None]
        inputs = {"interp": torch.from_numpy(np.stack([a["interp"] for a in arrays])[:, None]).to(device)
                  } if interpolated is not None else {}
        with torch.inference_mode():
            thin = model.sample(torch.from_numpy(clips).to(device), steps=config.evaluation_sample_steps,
                                generator=generator, **inputs)
        expected = (len(batch), 1, frames, height, width)
        if tuple(thin.shape) != expected:
            raise EvaluationError(f"volume {volume.volume_id}: model.sample returned shape {tuple(thin.shape)} for "
                                  f"thick clips of shape {clips.shape}; expected {expected}")
        thin = thin.float().cpu().numpy()[:, 0]
        for tile, clip in zip(batch, thin, strict=True):
            if not np.isfinite(clip).all():
                raise EvaluationError(
                    f"volume {volume.volume_id}: the model's prediction has {int((~np.isfinite(clip)).sum())} "
                    f"NaN/Inf values in the tile at thin slice {tile.z0}, row {tile.y0}, column {tile.x0}"
                )
            clip_hu = clip_to_hu(clip, intensity)
            weights = tile_weights(tile, n_thick)
            region = (slice(tile.z0, min(tile.z0 + tile.frames, covered)),
                      slice(tile.y0, min(tile.y0 + tile.height, rows)),
                      slice(tile.x0, min(tile.x0 + tile.width, cols)))
            inside = tuple(slice(0, r.stop - r.start) for r in region)
            total[region] += weights[inside] * clip_hu[inside]
            weight_sum[region] += weights[inside]
    uncovered = np.unique(np.nonzero(weight_sum == 0)[0])
    if len(uncovered):
        raise EvaluationError(f"volume {volume.volume_id}: no tile interpolates thin slices {uncovered[:10].tolist()} "
                              f"of {covered} (tiles {tiles[:3]}...)")
    windowed = total / weight_sum
    if interpolated is None:
        return windowed
    return with_input_range(windowed, interpolated[:covered], intensity)


def with_input_range(windowed_hu: np.ndarray, interpolated_hu: np.ndarray, intensity: Intensity) -> np.ndarray:
    """The model's output with the input's full HU range: its start (the interpolation, unclipped) plus only the
    correction the model made inside its intensity window.

    The model sees and returns HU clipped to data.intensity; returning that would flatten bone above the window
    (and air below it) in the volume a user gets, where the interpolation keeps it.
    """
    start_windowed = intensity.to_hu(intensity.to_unit(interpolated_hu))
    return (interpolated_hu + (windowed_hu - start_windowed)).astype(np.float32)


# ------------------------------------------------------------------------------------------- outputs
def write_prediction_nifti(path: Path, prediction_hu: np.ndarray, affine: np.ndarray, description: str = "") -> Path:
    """Write a (slice, row, col) HU prediction as NIfTI with the thin volume's affine (slice 0 = thin slice 0);
    `description` goes into the header's 80-character `descrip` field."""
    if len(description) > 80:
        raise ValueError(f"NIfTI description {description!r} is longer than the header's 80 characters")
    image = nib.Nifti1Image(prediction_hu.astype(np.float32), np.asarray(affine, dtype=np.float64))
    image.header["descrip"] = description
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(Path(path)) as tmp:
        # nibabel picks gzip from the file name; the temporary name has a .tmp suffix, so save via the bytes.
        Path(tmp).write_bytes(_nifti_bytes(image, Path(path).name.endswith(".gz")))
    return Path(path)


def _nifti_bytes(image: nib.Nifti1Image, gzipped: bool) -> bytes:
    data = image.to_bytes()
    if not gzipped:
        return data
    return gzip.compress(data, compresslevel=6, mtime=0)


def _mean_scores(volumes: list[VolumeResult], methods: list[str]) -> Scores:
    return {method: {subset: {name: float(np.mean([v.metrics[method][subset][name] for v in volumes]))
                              for name in METRIC_NAMES} for subset in SLICE_SETS} for method in methods}


def evaluate_volume(
    model: ClipSampler,
    volume: Preprocessed,
    config: RunConfig,
    out_dir: Path,
    generator: torch.Generator,
    weights_label: str,
) -> VolumeResult:
    """Predict, score (model and baselines), and write the NIfTI and panel of one volume; its report entry."""
    settings = config.evaluation
    thick = volume.thick
    covered = covered_slices(thick)
    if volume.thin.shape[0] < covered:
        raise EvaluationError(f"volume {volume.volume_id}: {volume.thin.shape[0]} thin slices, but its thick series "
                              f"covers {covered}")
    truth = volume.thin[:covered]
    # The interpolation a model with the v2v design starts from (shown beside what the model changed).
    start_hu = Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation).of(volume)

    def predict(sampler: ClipSampler) -> np.ndarray:
        prediction = predict_volume(sampler, volume, config, generator)
        return project_to_thick(prediction, thick, volume.thin.shape[0]) if settings.data_consistency else prediction

    prediction = predict(model)
    scores = {MODEL: score_volume(prediction, truth, thick.factor, settings.hu_min, settings.hu_max)}
    adaptation = None
    if settings.adapt.seconds > 0:
        adapted, adaptation = adapt_to_scan(model, volume, prediction, config, generator.device,
                                            settings.adapt.seconds)
        scores[MODEL_ADAPTED] = score_volume(predict(adapted), truth, thick.factor, settings.hu_min, settings.hu_max)
    for result in score_baselines(volume.thin, thick, settings.hu_min, settings.hu_max, settings.baselines):
        scores[result.method] = result.scores
    if settings.data_consistency:
        for method in settings.baselines:
            projected = project_to_thick(interpolate(thick, covered, method), thick, volume.thin.shape[0])
            scores[f"{method}+dc"] = score_volume(projected, truth, thick.factor, settings.hu_min, settings.hu_max)

    record = VolumeResult(id=volume.volume_id, thin_shape=list(volume.thin.shape), spacing_mm=list(volume.spacing),
                          thick_description=thick.describe(), n_thick=int(thick.array.shape[0]),
                          scored_slices=covered, metrics=scores,
                          adaptation=adaptation.to_dict() if adaptation is not None else None)
    if settings.write_nifti:
        nifti = write_prediction_nifti(out_dir / PREDICTIONS_DIR / f"{volume.volume_id}.nii.gz", prediction,
                                       volume.affine)
        record.prediction_nifti = nifti.relative_to(out_dir).as_posix()
    synthesized_psnr = ", ".join(f"{method} {s['synthesized']['psnr_db']:.2f} dB" for method, s in scores.items())
    title = [
        f"{volume.volume_id} - {config.variant} model - VAE weights: {weights_display(weights_label)}",
        f"HU window [{settings.hu_min:g}, {settings.hu_max:g}] - thick: {thick.describe()} - "
        f"{config.evaluation_sample_steps} sampling steps - {settings.panel_plane} reformat",
        f"PSNR on synthesized slices: {synthesized_psnr}",
    ]
    if weights_kind(weights_label) == "stand-in":
        title.insert(0, "STAND-IN WEIGHTS (random MAISI-layout VAE) - not MAISI's pretrained model")
    panel = render_panel(
        thick_nearest_hu=interpolate(thick, covered, "nearest"),
        model_hu=prediction,
        linear_hu=interpolate(thick, covered, "linear"),
        target_hu=truth,
        spacing_mm=volume.spacing,
        hu_min=settings.hu_min,
        hu_max=settings.hu_max,
        plane=settings.panel_plane,
        title_lines=title,
        start_hu=start_hu[:covered],
    )
    record.panel_png = write_panel(out_dir / PANELS_DIR / f"{volume.volume_id}.png", panel).relative_to(
        out_dir).as_posix()
    log.info("%s: PSNR on synthesized slices: %s", volume.volume_id, synthesized_psnr)
    return record


def model_settings(config: RunConfig) -> dict[str, Any]:
    """The settings besides data.thick, the HU window and the steps that move the model's scores (for report.json)."""
    dc = ("the model and the `<method>+dc` baselines projected onto the measured thick series "
          "(ctv2v.data.thick.project_to_thick)" if config.evaluation.data_consistency else "off")
    return {"resample": config.data.resample.model_dump(), "diffusion": config.diffusion.model_dump(),
            "v2v": config.v2v.model_dump(), "data_consistency": dc, "adapt": config.evaluation.adapt.model_dump()}


def evaluate(
    model: ClipSampler,
    manifest: dict,
    cache: PreprocessCache,
    dataset_dir: Path,
    config: RunConfig,
    out_dir: Path,
    generator: torch.Generator,
    *,
    weights_label: str,
) -> EvaluationReport:
    """Evaluate `model` on the manifest's test split; writes predictions, panels and report.json into `out_dir`.

    `weights_label` says which VAE weights the model holds (pretrained / scratch / stand-in, optionally with a
    detail after a comma); `generator` seeds sampling and sets the device the clips go to.
    """
    settings = config.evaluation
    kind = weights_kind(weights_label)
    if kind == "stand-in":
        log.warning("%s", STAND_IN_WARNING)
    out_dir = Path(out_dir)
    model.eval()
    all_test = evaluation_entries(manifest, None)
    entries = evaluation_entries(manifest, settings.max_volumes, settings.volume_ids)
    volumes = []
    for entry in entries:
        volume = cache.load(Path(dataset_dir), entry, config.data)
        volumes.append(evaluate_volume(model, volume, config, out_dir, generator, weights_label))
    thick = config.data.thick
    methods = [MODEL, *([MODEL_ADAPTED] if settings.adapt.seconds > 0 else []), *settings.baselines,
               *([f"{method}+dc" for method in settings.baselines] if settings.data_consistency else [])]
    report = EvaluationReport(
        variant=config.variant,
        weights_label=weights_label,
        manifest_sha256=manifest_sha256(manifest),
        hu_range=[settings.hu_min, settings.hu_max],
        model_intensity_window=[config.data.intensity.hu_min, config.data.intensity.hu_max],
        thick={"method": thick.method, "factor": thick.factor, "thickness_mm": thick.thickness_mm},
        sample_steps=config.evaluation_sample_steps,
        seed=config.seed,
        tiles={"frames": settings.tile_frames, "height": settings.tile_height, "width": settings.tile_width,
               "overlap": settings.tile_overlap, "batch_size": settings.tile_batch_size,
               "memory_share": settings.tile_memory_share, "training_crop": [config.data.clip.frames,
                                                                              config.data.clip.height,
                                                                              config.data.clip.width]},
        test_volumes_in_split=len(all_test),
        baselines=list(settings.baselines),
        **glossary(settings.hu_min, settings.hu_max),
        aggregate=_mean_scores(volumes, methods),
        volumes=volumes,
        model_settings=model_settings(config),
    )
    report.write(out_dir / REPORT_FILE)
    return report
