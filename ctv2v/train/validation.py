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
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import eval_tiles, extract_clip
from ctv2v.data.interpolation import Interpolation, covered_slices
from ctv2v.train.device import Precision
from ctv2v.intensity import Intensity
from ctv2v.evaluate.metrics import METRIC_NAMES, SLICE_SETS, score_volume
from ctv2v.models.vae import ClipVAE

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- validation
TISSUE_HU = -500.0
"""Voxels above this HU count as tissue when validation clips are picked (air and lung lie below)."""


def vae_val_clips(volumes: list[Preprocessed], config: RunConfig) -> list[dict]:
    """training.val_clips fixed val clips holding the interpolation the model starts from (config.v2v): a VAE's
    validation scores its ceiling decode(encode(thin)) beside that interpolation (validate_vae's val_interp_*)."""
    return fixed_val_clips(volumes, config.data.clip, Intensity.from_config(config.data.intensity),
                           config.training.val_clips,
                           Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation))


def fixed_val_clips(volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, count: int,
                    interpolation: Interpolation | None = None) -> list[dict]:
    """The `count` evaluation tiles of the val volumes with the most tissue: the same clips every epoch.

    With `interpolation`, each clip also holds the clip of its volume's interpolation (`interp`).

    Spreading picks over the tiles took the volume's corners, i.e. air, whose constant clips made val_loss
    and val PSNR measure nothing. Ties keep tile order, so the pick is deterministic.
    """
    tiles = []
    for volume in volumes:
        # A val volume shorter than the clip gets clips of the whole thick slabs it holds: frames past its end
        # would be scored against padding, not against slices.
        k = volume.thick.factor
        frames = min(clip.frames, max((covered_slices(volume.thick) - 1) // k * k, -(-4 // k) * k))
        for tile in eval_tiles(volume.thin.shape, clip.model_copy(update={"frames": frames}), k,
                               volume.thick.array.shape[0]):
            thin = volume.thin[tile.z0:tile.z0 + tile.frames, tile.y0:tile.y0 + tile.height,
                               tile.x0:tile.x0 + tile.width]
            tiles.append((float((thin > TISSUE_HU).mean()), volume, tile))
    if not tiles:
        raise TrainingError("validation needs at least one val volume")
    ranked = sorted(range(len(tiles)), key=lambda i: -tiles[i][0])
    clips = []
    for index in ranked[:count]:
        tissue, volume, tile = tiles[index]
        if tissue == 0.0:
            raise TrainingError(f"val volume {volume.volume_id}: tile at {tile} holds no voxel above {TISSUE_HU} HU; "
                                f"only {len(clips)} val tiles hold tissue, training.val_clips is {count}")
        interpolated = interpolation.of(volume) if interpolation is not None else None
        arrays = extract_clip(volume, tile, intensity, interpolated)
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
def validate_diffusion(model: nn.Module, clips: list[dict], ema: AveragedModel | None, config: RunConfig,
                       device: torch.device, precision: Precision) -> dict[str, float]:
    """Loss on fixed val clips and every metric (HU, evaluation window) of clips sampled with few steps.

    When the clips hold their interpolation, its scores on the same clips are reported too (`val_interp_*`):
    the model's starting point, which it should beat.

    Runs under a forked RNG seeded with the run's seed: the numbers are comparable across epochs and the
    training RNG stream (and hence an exact resume) is untouched.
    """
    settings = config.training
    window = Intensity(config.evaluation.hu_min, config.evaluation.hu_max)
    data_window = Intensity.from_config(config.data.intensity)
    losses, scores, interp_scores = [], [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), denoiser_swapped(model, ema.module if ema else None) as scored:
        torch.manual_seed(config.seed)
        for index, clip in enumerate(clips):
            thin, thick = clip["thin"].to(device), clip["thick"].to(device)
            interp = clip["interp"].to(device) if "interp" in clip else None
            with precision.autocast(device):
                loss, _ = scored.loss(thick, thin, interp=interp)
            losses.append(float(loss))
            if index < settings.val_sample_clips:
                with precision.autocast(device):
                    pred = scored.sample(thick, steps=config.validation_sample_steps, interp=interp)
                pred_hu = data_window.to_hu(pred.float().clamp(0, 1))[0, 0].cpu().numpy()
                true_hu = data_window.to_hu(thin.float())[0, 0].cpu().numpy()
                scores.append(score_volume(pred_hu, true_hu, config.data.thick.factor, window.hu_min, window.hu_max))
                if interp is not None:
                    interp_hu = data_window.to_hu(interp.float())[0, 0].cpu().numpy()
                    interp_scores.append(score_volume(interp_hu, true_hu, config.data.thick.factor, window.hu_min,
                                                      window.hu_max))
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
