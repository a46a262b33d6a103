"""Validation during training: fixed val clips, the diffusion model's and the scratch VAE's scores."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ctv2v.train.loop import TrainingError
from ctv2v.config import ClipConfig, RunConfig
from ctv2v.data.augment import validation_views
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import eval_tiles, extract_clip
from ctv2v.data.interpolation import Interpolation, covered_slices
from ctv2v.device import Precision
from ctv2v.intensity import Intensity
from ctv2v.data.thick import project_to_thick
from ctv2v.evaluate.evaluate import predict_volume
from ctv2v.evaluate.metrics import METRIC_NAMES, SLICE_SETS, SSIM_WINDOW, score_volume
from ctv2v.models.vae import ClipVAE

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- validation
TISSUE_HU = -500.0
"""Voxels above this HU count as tissue when validation clips are picked (air and lung lie below)."""


def val_views_of(volumes: list[Preprocessed], config: RunConfig) -> list[Preprocessed]:
    """The val volumes' validation views (data.augment.axes: every axis of an isotropic val volume as the slice
    axis), volume by volume."""
    return [view for volume in volumes for view in validation_views(volume, config.data.augment, config.data.thick)]


def val_clips_of(volumes: list[Preprocessed], config: RunConfig, interpolation: Interpolation | None) -> list[dict]:
    """training.val_clips fixed clips of the val volumes' validation views, holding `interpolation`'s clip when it
    is given."""
    return fixed_val_clips(val_views_of(volumes, config), config.data.clip,
                           Intensity.from_config(config.data.intensity), config.training.val_clips, interpolation)


def scored_val_views(volumes: list[Preprocessed], config: RunConfig) -> list[Preprocessed]:
    """The first training.val_scored_views validation views, each large enough to be scored."""
    views = val_views_of(volumes, config)[:config.training.val_scored_views]
    for view in views:
        scored = (covered_slices(view.thick), *view.thin.shape[1:])
        if min(scored) < SSIM_WINDOW:
            raise TrainingError(f"val view {view.volume_id}: {scored[0]} covered slices x {scored[1]} x {scored[2]} "
                                f"is smaller than SSIM's {SSIM_WINDOW}-voxel window; lower training.val_scored_views "
                                "(0 tracks the val loss only)")
    return views


def vae_val_clips(volumes: list[Preprocessed], config: RunConfig) -> list[dict]:
    """Val clips holding the interpolation the model starts from (config.v2v): a VAE's validation scores its
    ceiling decode(encode(thin)) beside that interpolation (validate_vae's val_interp_*)."""
    return val_clips_of(volumes, config, Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation))


def fixed_val_clips(volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, count: int,
                    interpolation: Interpolation | None = None) -> list[dict]:
    """`count` evaluation tiles of the val volumes, those with the most tissue first, taken from each volume in
    turn: the same clips every epoch.

    With `interpolation`, each clip also holds the clip of its volume's interpolation (`interp`).

    Spreading picks over the tiles took the volume's corners, i.e. air, whose constant clips made val_loss
    and val PSNR measure nothing. Taking the volumes in turn keeps every view scored (one view's tiles can all hold
    more tissue than another's). Ties keep tile order, so the pick is deterministic.
    """
    ranked_per_volume = []
    for volume in volumes:
        # A val volume smaller than the clip gets clips of the whole thick slabs and rows it holds: voxels past its
        # end would be scored against padding, not against the scan.
        k = volume.thick.factor
        frames = min(clip.frames, max((covered_slices(volume.thick) - 1) // k * k, -(-4 // k) * k))
        size = clip.model_copy(update={"frames": frames, "height": min(clip.height, volume.thin.shape[1]),
                                       "width": min(clip.width, volume.thin.shape[2])})
        tiles = []
        for tile in eval_tiles(volume.thin.shape, size, k, volume.thick.array.shape[0]):
            thin = volume.thin[tile.z0:tile.z0 + tile.frames, tile.y0:tile.y0 + tile.height,
                               tile.x0:tile.x0 + tile.width]
            tiles.append((float((thin > TISSUE_HU).mean()), volume, tile))
        ranked_per_volume.append(sorted(tiles, key=lambda picked: -picked[0]))
    picks = [ranked[rank] for rank in range(max(map(len, ranked_per_volume), default=0))
             for ranked in ranked_per_volume if rank < len(ranked)]
    if not picks:
        raise TrainingError("validation needs at least one val volume")
    clips = []
    interpolated = {}
    for tissue, volume, tile in picks[:count]:
        if tissue == 0.0:
            raise TrainingError(f"val volume {volume.volume_id}: tile at {tile} holds no voxel above {TISSUE_HU} HU; "
                                f"only {len(clips)} val tiles hold tissue, training.val_clips is {count}")
        if interpolation is not None and volume.volume_id not in interpolated:
            interpolated[volume.volume_id] = interpolation.of(volume)
        arrays = extract_clip(volume, tile, intensity, interpolated.get(volume.volume_id))
        clips.append({name: torch.from_numpy(array)[None, None] for name, array in arrays.items()}
                     | {"volume_id": volume.volume_id})
    return clips


@contextlib.contextmanager
def denoiser_swapped(model: nn.Module, denoiser: nn.Module | None) -> Iterator[nn.Module]:
    """`model` with `denoiser` (e.g. the EMA's) in place of its own for the duration; None keeps its own."""
    if denoiser is None:
        yield model
        return
    own = model.denoiser
    model.denoiser = denoiser
    try:
        yield model
    finally:
        model.denoiser = own


@torch.no_grad()
def validate_diffusion(model: nn.Module, clips: list[dict], views: list[Preprocessed], ema: AveragedModel | None,
                       config: RunConfig, device: torch.device, precision: Precision) -> dict[str, float]:
    """Loss on fixed val clips, and every metric (HU, evaluation window, synthesized and all slices) of whole val
    views predicted as the evaluate step predicts a scan: tiles, the validation's sampling steps
    (training.val_sample_steps, else diffusion.sample_steps), data consistency when evaluation.data_consistency is
    on.

    When the model starts from an interpolation, that start's scores on the same views are reported too
    (`val_interp_*`): the number the model should beat.

    Runs under a forked RNG seeded with the run's seed: the numbers are comparable across epochs and the
    training RNG stream (and hence an exact resume) is untouched.
    """
    window = Intensity(config.evaluation.hu_min, config.evaluation.hu_max)
    as_validated = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"sample_steps": config.validation_sample_steps})})
    losses, scores, interp_scores = [], [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), denoiser_swapped(model, ema.module if ema else None) as scored:
        torch.manual_seed(config.seed)
        for clip in clips:
            thin, thick = clip["thin"].to(device), clip["thick"].to(device)
            interp = clip["interp"].to(device) if "interp" in clip else None
            with precision.autocast(device):
                loss, _ = scored.loss(thick, thin, interp=interp)
            losses.append(float(loss))
        for view in views:
            covered = covered_slices(view.thick)
            truth = view.thin[:covered]
            with precision.autocast(device):
                prediction = predict_volume(scored, view, as_validated, torch.Generator(device).manual_seed(config.seed))
            if config.evaluation.data_consistency:
                prediction = project_to_thick(prediction, view.thick, view.thin.shape[0])
            k = view.thick.factor
            scores.append(score_volume(prediction, truth, k, window.hu_min, window.hu_max))
            if scored.interpolation is not None:
                start = scored.interpolation.of(view)[:covered]
                interp_scores.append(score_volume(start, truth, k, window.hu_min, window.hu_max))
    return {"val_loss": float(np.mean(losses)), **_mean_scores(scores), **_mean_scores(interp_scores, "val_interp")}


@torch.no_grad()
def validate_vae(vae: ClipVAE, clips: list[dict], config: RunConfig, device: torch.device,
                 precision: Precision) -> dict[str, float]:
    """L1 (`val_loss`) and every metric (HU, evaluation window) of one reconstruction of fixed val clips.

    Both scores see the same output: the deterministic reconstruction clamped to the [0, 1] input range. This is
    the VAE's ceiling decode(encode(thin)); when the clips hold their interpolation, its scores on the same clips
    are reported beside it (`val_interp_*`), so a reader sees at once whether the VAE can support the model.
    """
    window = Intensity(config.evaluation.hu_min, config.evaluation.hu_max)
    data_window = Intensity.from_config(config.data.intensity)
    k = config.data.thick.factor
    losses, scores, interp_scores = [], [], []
    for clip in clips:
        thin = clip["thin"].to(device)
        with precision.autocast(device):
            recon = vae.decode(vae.encode(thin), tuple(thin.shape[2:])).float().clamp(0, 1)
        losses.append(float(F.l1_loss(recon, thin)))
        true_hu = data_window.to_hu(thin)[0, 0].cpu().numpy()
        scores.append(score_volume(data_window.to_hu(recon)[0, 0].cpu().numpy(), true_hu, k, window.hu_min,
                                   window.hu_max))
        if "interp" in clip:
            interp_scores.append(score_volume(data_window.to_hu(clip["interp"])[0, 0].numpy(), true_hu, k,
                                              window.hu_min, window.hu_max))
    return {"val_loss": float(np.mean(losses)), **_mean_scores(scores), **_mean_scores(interp_scores, "val_interp")}


def _mean_scores(scores: list[dict], prefix: str = "val") -> dict[str, float]:
    """Mean of every metric (METRIC_NAMES) over scored clips, per slice set (nothing when no clip was scored)."""
    if not scores:
        return {}
    return {f"{prefix}_{metric}_{subset}": float(np.mean([s[subset][metric] for s in scores]))
            for subset in SLICE_SETS for metric in METRIC_NAMES}
