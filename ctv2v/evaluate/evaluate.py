"""Test-set evaluation: whole volumes through overlapping tiles, scored in HU next to the interpolation baselines.

Each test volume's thick series is cut into the overlapping clips of ctv2v.data.clips.eval_tiles; the model
samples the thin clip of each, and the clips are blended back with smooth weights (a sine bump per axis,
highest in a tile's centre, so no seam shows where tiles meet). Along z a tile's weight is zero after its last
real thick slice: those frames would be extrapolated from one side only, and the tile that holds the next
thick slice interpolates them instead. Every thin slice from the first to the last thick position is
therefore covered by interpolating tiles only; the slices after the last thick position are not predicted
and not scored (the baselines are scored on the same covered range, ctv2v.evaluate.baselines). The model sees the
thick series clipped to its input window (data.intensity, ctv2v.intensity) while the baselines interpolate
raw HU; both are clipped to the evaluation window before scoring.

Per volume the step writes the prediction as NIfTI (the thin volume's own affine: same origin, orientation
and thin spacing), a PNG panel (ctv2v.evaluate.panels) and its scores; `report.json` holds them all with the mean over
volumes and every setting that moves the numbers (HU window, thick-slice method, sampling steps, weights).
A perfect score (infinite PSNR) is written as JSON `Infinity`, which Python's json module reads back.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from ctv2v.evaluate.baselines import covered_slices, interpolate
from ctv2v.config import RunConfig
from ctv2v.data.cache import Preprocessed, PreprocessCache
from ctv2v.data.clips import Tile, eval_tiles, extract_clip
from ctv2v.files import atomic_path, atomic_write_text
from ctv2v.intensity import Intensity
from ctv2v.evaluate.metrics import METRIC_NAMES, SLICE_SETS, score_volume
from ctv2v.evaluate.panels import render_panel, write_panel
from ctv2v.evaluate.baseline_report import score_baselines
from ctv2v.models.vae import WEIGHT_LABELS

log = logging.getLogger(__name__)

REPORT_SCHEMA = "ctv2v.evaluation/1"
REPORT_FILE = "report.json"
PREDICTIONS_DIR = "predictions"
PANELS_DIR = "panels"
MODEL = "model"
"""The method name of the model among the scored methods (the others are baseline names)."""
STAND_IN_WARNING = ("STAND-IN WEIGHTS: the VAE holds random values in MAISI's layout, not MAISI's published "
                    "weights; these numbers say nothing about the pretrained VAE")


class EvaluationError(ValueError):
    """The model or the data cannot be evaluated as asked; the message names the volume, tile or key."""


class ClipSampler(Protocol):
    """What evaluation needs of a model: thick clip (B, 1, T/k, H, W) in [0, 1] -> thin clip (B, 1, T, H, W)."""

    def eval(self) -> Any: ...

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


def weights_kind(label: str) -> str:
    """The kind of a VAE weights label ('scratch, fine-tuned (full phase)' -> 'scratch'); unknown kinds are errors."""
    kind = label.split(",", 1)[0].strip()
    if kind not in WEIGHT_LABELS:
        raise EvaluationError(f"VAE weights label {label!r}: expected it to start with one of {WEIGHT_LABELS}")
    return kind


def weights_display(label: str) -> str:
    """How a weights label is shown to readers; stand-in weights are always named as such."""
    kind = weights_kind(label)
    detail = label.split(",", 1)[1].strip() if "," in label else ""
    shown = {
        "stand-in": "stand-in (random MAISI-layout weights)",
        "pretrained": "pretrained (MAISI CT VAE weights)",
        "scratch": "VAE trained from scratch",
    }[kind]
    return f"{shown}, {detail}" if detail else shown


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


def predict_volume(
    model: ClipSampler,
    volume: Preprocessed,
    config: RunConfig,
    generator: torch.Generator,
) -> np.ndarray:
    """The model's thin series in HU over the covered range (thin slices 0..(n_thick-1)*k), blended from tiles."""
    intensity = Intensity.from_config(config.data.intensity)
    thick = volume.thick
    n_thick = thick.array.shape[0]
    covered = covered_slices(thick)
    rows, cols = volume.thin.shape[1:]
    tiles = eval_tiles(volume.thin.shape, config.data.clip, thick.factor, n_thick=n_thick)
    total = np.zeros((covered, rows, cols), dtype=np.float32)
    weight_sum = np.zeros_like(total)
    batch_size = config.evaluation.tile_batch_size
    device = generator.device
    for start in tqdm(range(0, len(tiles), batch_size), desc=f"evaluate {volume.volume_id}", unit="batch",
                      leave=False):
        batch = tiles[start:start + batch_size]
        clips = np.stack([extract_clip(volume, tile, intensity)["thick"] for tile in batch])[:, None]
        with torch.inference_mode():
            thin = model.sample(torch.from_numpy(clips).to(device), steps=config.evaluation.sample_steps,
                                generator=generator)
        expected = (len(batch), 1, config.data.clip.frames, config.data.clip.height, config.data.clip.width)
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
            # The model's output range is the intensity window it was trained on: [0, 1].
            clip_hu = intensity.to_hu(np.clip(clip, 0.0, 1.0))
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
    return total / weight_sum


# ------------------------------------------------------------------------------------------- outputs
def write_prediction_nifti(path: Path, prediction_hu: np.ndarray, affine: np.ndarray) -> Path:
    """Write a (slice, row, col) HU prediction as NIfTI with the thin volume's affine (slice 0 = thin slice 0)."""
    image = nib.Nifti1Image(prediction_hu.astype(np.float32), np.asarray(affine, dtype=np.float64))
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


def _scores_only(result: dict) -> dict:
    return {subset: {name: result[subset][name] for name in METRIC_NAMES} for subset in SLICE_SETS}


def _mean_scores(volumes: list[dict], methods: list[str]) -> dict:
    return {method: {subset: {name: float(np.mean([v["metrics"][method][subset][name] for v in volumes]))
                              for name in METRIC_NAMES} for subset in SLICE_SETS} for method in methods}


def evaluate_volume(
    model: ClipSampler,
    volume: Preprocessed,
    config: RunConfig,
    out_dir: Path,
    generator: torch.Generator,
    weights_label: str,
) -> dict[str, Any]:
    """Predict, score (model and baselines), and write the NIfTI and panel of one volume; its report entry."""
    settings = config.evaluation
    thick = volume.thick
    covered = covered_slices(thick)
    if volume.thin.shape[0] < covered:
        raise EvaluationError(f"volume {volume.volume_id}: {volume.thin.shape[0]} thin slices, but its thick series "
                              f"covers {covered}")
    truth = volume.thin[:covered]
    prediction = predict_volume(model, volume, config, generator)
    scores = {MODEL: score_volume(prediction, truth, thick.factor, settings.hu_min, settings.hu_max)}
    for result in score_baselines(volume.thin, thick, settings.hu_min, settings.hu_max, settings.baselines):
        scores[result["method"]] = _scores_only(result)

    record: dict[str, Any] = {
        "id": volume.volume_id,
        "thin_shape": list(volume.thin.shape),
        "spacing_mm": list(volume.spacing),
        "thick_description": thick.describe(),
        "n_thick": int(thick.array.shape[0]),
        "scored_slices": covered,
        "metrics": scores,
    }
    if settings.write_nifti:
        nifti = write_prediction_nifti(out_dir / PREDICTIONS_DIR / f"{volume.volume_id}.nii.gz", prediction,
                                       volume.affine)
        record["prediction_nifti"] = nifti.relative_to(out_dir).as_posix()
    synthesized_psnr = ", ".join(f"{method} {s['synthesized']['psnr_db']:.2f} dB" for method, s in scores.items())
    title = [
        f"{volume.volume_id} - {config.variant} model - VAE weights: {weights_display(weights_label)}",
        f"HU window [{settings.hu_min:g}, {settings.hu_max:g}] - thick: {thick.describe()} - "
        f"{settings.sample_steps} sampling steps - {settings.panel_plane} reformat",
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
    )
    record["panel_png"] = write_panel(out_dir / PANELS_DIR / f"{volume.volume_id}.png", panel).relative_to(
        out_dir).as_posix()
    log.info("%s: PSNR on synthesized slices: %s", volume.volume_id, synthesized_psnr)
    return record


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
) -> dict[str, Any]:
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
    methods = [MODEL, *settings.baselines]
    thick = config.data.thick
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "variant": config.variant,
        "weights": kind,
        "weights_label": weights_label,
        "weights_display": weights_display(weights_label),
        "manifest_sha256": manifest_sha256(manifest),
        "hu_range": [settings.hu_min, settings.hu_max],
        "model_intensity_window": [config.data.intensity.hu_min, config.data.intensity.hu_max],
        "thick": {"method": thick.method, "factor": thick.factor, "thickness_mm": thick.thickness_mm},
        "sample_steps": settings.sample_steps,
        "seed": config.seed,
        "tiles": {"frames": config.data.clip.frames, "height": config.data.clip.height,
                  "width": config.data.clip.width, "overlap": config.data.clip.eval_overlap},
        "split": "test",
        "test_volumes_in_split": len(all_test),
        "n_volumes": len(volumes),
        "volume_ids": [v["id"] for v in volumes],
        "baselines": list(settings.baselines),
        "scored_range": "thin slices 0..(n_thick-1)*k, from the first to the last thick position",
        "slice_sets": {"all": "every scored thin slice",
                       "synthesized": "scored thin slices no thick slice sits on (index not a multiple of k)"},
        "metrics": {
            "psnr_db": f"PSNR in dB, HU clipped to [{settings.hu_min:g}, {settings.hu_max:g}], data range "
                       f"{settings.hu_max - settings.hu_min:g} HU",
            "ssim_3d": "MONAI SSIM 3D (Gaussian window 11, sigma 1.5) on the HU window mapped to [0, 1]",
            "ssim_2d": "MONAI SSIM 2D per axial slice, mean over the slice set",
            "mae_hu": "mean absolute error in HU after clipping",
        },
        "aggregate_over": "mean over volumes of each volume's metric",
        "aggregate": _mean_scores(volumes, methods),
        "volumes": volumes,
    }
    if kind == "stand-in":
        report["warning"] = STAND_IN_WARNING
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report
