"""Test-time self-supervision: fine-tune the denoiser on the scan it is about to predict (evaluation.adapt).

A thick series holds thin truth in-plane: its rows and columns are sampled finely. So the model's own thin series
of the scan (before adaptation, with data consistency when evaluation.data_consistency is on), resampled in-plane
to the thin slice spacing, is cut into training views whose slice axis is one of the two in-plane axes, with slab
xk simulated along it (every phase; ctv2v.data.augment), and the denoiser trains on them for a bounded time with
the VAE frozen (SMORE, Zhao et al. 2020, applied to the latent model). No thin slice of the scan's own z axis is
used: it is what the model is asked to make.

The scan's z axis runs across every training frame of those views. Taken from the interpolation, it is blurred
there as in nothing the model predicts, and the trained cpu-quality model lost 0.07 / 0.05 dB on example_ct /
example_ct_sm after 300 steps on it; on its own prediction -0.02 / +0.12 dB, and +0.01 / +0.11 dB with the
average of its weights over the steps (evaluation.adapt.ema_decay), the unseen head CT gaining +0.95 dB (the
README's quality section has the settings).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from ctv2v.config import ResampleConfig, RunConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import TrainClips
from ctv2v.data.interpolation import covered_slices
from ctv2v.data.thick import resample_spacing, simulate_thick
from ctv2v.intensity import Intensity

log = logging.getLogger(__name__)

IN_PLANE_AXES = (1, 2)


@dataclass(frozen=True)
class Adaptation:
    """How one scan's adaptation went (logged and written into reports beside the adapted model's scores)."""

    seconds_budget: float
    steps: int
    seconds: float
    first_loss: float
    last_loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def in_plane_training_volume(volume: Preprocessed, predicted_hu: np.ndarray, config: RunConfig) -> Preprocessed:
    """The model's thin series of the scan over its covered slices on an isotropic grid at the thin slice
    spacing."""
    covered = covered_slices(volume.thick)
    thin_mm = float(volume.spacing[0])
    iso, spacing, affine = resample_spacing(predicted_hu[:covered], volume.spacing, volume.affine,
                                            ResampleConfig(slice_mm=None, pixel_mm=thin_mm))
    return Preprocessed(f"{volume.volume_id}:in-plane", iso, simulate_thick(iso, thin_mm, config.data.thick),
                        spacing, affine)


def adapt_to_scan(model: torch.nn.Module, volume: Preprocessed, predicted_hu: np.ndarray, config: RunConfig,
                  device: torch.device, seconds: float) -> tuple[torch.nn.Module, Adaptation]:
    """A copy of `model` whose denoiser was fine-tuned on `volume`'s in-plane axes for at most `seconds` (and at
    most evaluation.adapt.steps steps); `model` itself is left as it was.

    `predicted_hu` is `model`'s thin series of `volume` in HU (thin slices 0..covered-1 at least), as the caller
    predicted it before adapting."""
    settings = config.evaluation.adapt
    adapted = copy.deepcopy(model)
    adapted.freeze_vae()
    training_volume = in_plane_training_volume(volume, predicted_hu, config)
    clip = config.data.clip.model_copy(update={"clips_per_volume": settings.steps * settings.batch_size})
    clips = TrainClips([training_volume], clip, Intensity.from_config(config.data.intensity), config.seed,
                       adapted.interpolation, config.data.augment, config.data.thick,
                       slice_axes=IN_PLANE_AXES)
    loader = DataLoader(clips, batch_size=settings.batch_size, shuffle=False, num_workers=0)
    optimizer = torch.optim.Adam(adapted.denoiser.parameters(), lr=settings.lr)
    average = None
    if settings.ema_decay is not None:
        average = AveragedModel(adapted.denoiser, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay),
                                use_buffers=True)
        average.update_parameters(adapted.denoiser)  # the first update copies: the average starts at the model
    adapted.train()
    started = time.perf_counter()
    losses: list[float] = []
    # A forked RNG seeded with the run's seed: adaptation is reproducible, and predicting several scans (or what the
    # caller draws next) does not depend on how many steps an earlier scan's time budget allowed.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(config.seed)
        for batch in loader:
            if time.perf_counter() - started >= seconds:
                break
            interp = batch["interp"].to(device) if "interp" in batch else None
            loss, _ = adapted.loss(batch["thick"].to(device), batch["thin"].to(device), interp=interp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if average is not None:
                average.update_parameters(adapted.denoiser)
            losses.append(float(loss.detach()))
    if average is not None:
        adapted.denoiser.load_state_dict(average.module.state_dict())
    adapted.eval()
    if not losses:
        raise ValueError(f"evaluation.adapt.seconds={seconds:g}: no adaptation step fits in the budget")
    report = Adaptation(float(seconds), len(losses), time.perf_counter() - started, losses[0], losses[-1])
    log.info("%s: adapted on its in-plane axes for %d steps in %.0f s (budget %g s), loss %.5f -> %.5f",
             volume.volume_id, report.steps, report.seconds, seconds, report.first_loss, report.last_loss)
    return adapted, report
