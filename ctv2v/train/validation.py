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
from ctv2v.train.device import Precision
from ctv2v.intensity import Intensity
from ctv2v.evaluate.metrics import score_volume
from ctv2v.models.vae import ClipVAE

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- validation
def fixed_val_clips(volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, count: int) -> list[dict]:
    """`count` clips spread evenly over the val volumes' evaluation tiles: the same clips every epoch."""
    tiles = [(volume, tile) for volume in volumes
             for tile in eval_tiles(volume.thin.shape, clip, volume.thick.factor, volume.thick.array.shape[0])]
    if not tiles:
        raise TrainingError("validation needs at least one val volume")
    picks = np.unique(np.linspace(0, len(tiles) - 1, num=min(count, len(tiles))).round().astype(int))
    clips = []
    for index in picks:
        volume, tile = tiles[index]
        arrays = extract_clip(volume, tile, intensity)
        clips.append({"thin": torch.from_numpy(arrays["thin"])[None, None],
                      "thick": torch.from_numpy(arrays["thick"])[None, None], "volume_id": volume.volume_id})
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
    """Loss on fixed val clips and PSNR/SSIM (HU, evaluation window) of clips sampled with few steps.

    Runs under a forked RNG seeded with the run's seed: the numbers are comparable across epochs and the
    training RNG stream (and hence an exact resume) is untouched.
    """
    settings = config.training
    window = Intensity(config.evaluation.hu_min, config.evaluation.hu_max)
    data_window = Intensity.from_config(config.data.intensity)
    losses, scores = [], []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), denoiser_swapped(model, ema.module if ema else None) as scored:
        torch.manual_seed(config.seed)
        for index, clip in enumerate(clips):
            thin, thick = clip["thin"].to(device), clip["thick"].to(device)
            with precision.autocast(device):
                loss, _ = scored.loss(thick, thin)
            losses.append(float(loss))
            if index < settings.val_sample_clips:
                with precision.autocast(device):
                    pred = scored.sample(thick, steps=settings.val_sample_steps)
                pred_hu = data_window.to_hu(pred.float().clamp(0, 1))[0, 0].cpu().numpy()
                true_hu = data_window.to_hu(thin.float())[0, 0].cpu().numpy()
                scores.append(score_volume(pred_hu, true_hu, config.data.thick.factor, window.hu_min, window.hu_max))
    return {"val_loss": float(np.mean(losses)), **_mean_scores(scores)}


@torch.no_grad()
def validate_vae(vae: ClipVAE, clips: list[dict], config: RunConfig, device: torch.device,
                 precision: Precision) -> dict[str, float]:
    """L1 (`val_loss`) and PSNR/SSIM (HU, evaluation window) of the deterministic reconstruction of fixed val clips."""
    window = Intensity(config.evaluation.hu_min, config.evaluation.hu_max)
    data_window = Intensity.from_config(config.data.intensity)
    losses, scores = [], []
    for clip in clips:
        thin = clip["thin"].to(device)
        with precision.autocast(device):
            recon = vae.decode(vae.encode(thin), tuple(thin.shape[2:])).float()
        losses.append(float(F.l1_loss(recon, thin)))
        scores.append(score_volume(data_window.to_hu(recon.clamp(0, 1))[0, 0].cpu().numpy(),
                                   data_window.to_hu(thin)[0, 0].cpu().numpy(), config.data.thick.factor,
                                   window.hu_min, window.hu_max))
    return {"val_loss": float(np.mean(losses)), **_mean_scores(scores)}


def _mean_scores(scores: list[dict]) -> dict[str, float]:
    """Mean PSNR and 2D SSIM over scored clips, per slice set (nothing when no clip was scored)."""
    if not scores:
        return {}
    return {f"val_{metric}_{subset}": float(np.mean([s[subset][metric] for s in scores]))
            for subset in ("all", "synthesized") for metric in ("psnr_db", "ssim_2d")}
