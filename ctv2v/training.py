"""The training loop, shared by the scratch VAE and both diffusion phases, plus the frozen phase's latent cache.

One loop (nanoGPT style): get a batch, forward under autocast, backward through the GradScaler, accumulate
`training.grad_accum_steps` micro-batches, unscale and clip, step, schedule, update the EMA, log,
checkpoint. What is optimized is an `Objective`: a module whose forward turns a batch into (loss, parts);
under torchrun it is wrapped in DistributedDataParallel, so gradient averaging covers exactly the
parameters that require gradients (the denoiser; the VAE too once it is unfrozen).

Exact resume: the data order is a pure function of (seed, epoch, rank) and every dataset item a pure
function of (seed, epoch, index); model, optimizer, scaler, scheduler, EMA and every process's RNG states
are checkpointed at optimizer-step boundaries together with the position in the epoch, and the DataLoader
gets its own generator so that creating an iterator never draws from the global RNG.

The frozen phase's latent cache: with the VAE frozen, encoding is a fixed function, so each training volume
(thin and thick) is encoded once, in tiles whose origins and sizes are multiples of the VAE's downsampling
factors, and clips are cropped from the latents at origins that are multiples of the factors (and of the
thick factor in depth). A latent crop then covers exactly the voxels of its image crop. Two documented
differences from encoding every clip on its own: the encoder sees the volume around the crop (context the
per-clip path pads instead), and clips are not flipped, because the encoder is not flip-equivariant: a
flipped latent is not the latent of the flipped clip, so the denoiser would learn from latents no image has.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ctv2v.checkpointing import Progress, capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from ctv2v.config import ClipConfig, RunConfig, TrainingConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import eval_tiles, extract_clip
from ctv2v.device import Distributed, Precision, distributed_from_env, resolve_precision, select_device
from ctv2v.intensity import Intensity
from ctv2v.metrics import score_volume
from ctv2v.vae import ClipVAE, kl_divergence

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or continue as configured; the message says which setting or file."""


# ---------------------------------------------------------------------------------------- objectives
class DiffusionObjective(nn.Module):
    """The diffusion loss of a batch of image clips (`thin`, `thick`) or of cached latents."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "thin_latent" in batch:
            return self.model.loss_from_latents(batch["thick_latent"], batch["thin_latent"])
        return self.model.loss(batch["thick"], batch["thin"])


class ScratchVAEObjective(nn.Module):
    """L1 reconstruction of a sampled latent plus kl_weight x KL, on thin clips (the scratch VAE's training)."""

    def __init__(self, vae: ClipVAE, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clip = batch["thin"]
        mu, logvar = self.vae.encode_posterior(clip)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self.vae.decode(z * self.vae.latent_scale, tuple(clip.shape[2:]))
        l1 = F.l1_loss(recon.float(), clip.float())
        kl = kl_divergence(mu.float(), logvar.float())
        return l1 + self.kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}


# ------------------------------------------------------------------------------------- data order
class ShardSampler(Sampler[int]):
    """A seeded permutation per epoch, padded to a multiple of the world size and sharded by rank.

    Like DistributedSampler, but it can start in the middle of an epoch (`set_position`), which is what an
    exact resume needs; every rank gets the same number of items, so DDP never waits on a missing batch.
    """

    def __init__(self, length: int, *, seed: int, rank: int, world_size: int):
        if length == 0:
            raise TrainingError("the training set is empty")
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.per_rank = math.ceil(length / world_size)
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th item."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        total = self.per_rank * self.world_size
        padded = order.repeat(math.ceil(total / self.length))[:total]
        return iter(padded[self.rank :: self.world_size][self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


# ----------------------------------------------------------------------------------- latent cache
@dataclass
class VolumeLatents:
    """A training volume's thin and thick latents (C, D', H', W') and the image extents they cover."""

    volume_id: str
    thin: torch.Tensor
    thick: torch.Tensor
    thin_shape: tuple[int, int, int]
    """The thin volume's (slices, rows, cols) before padding."""
    thick_slices: int


CACHE_TILE_OVERLAP = 0.125
"""Overlap of neighbouring cache tiles: enough context at tile borders for a few convolution layers, at
(8/7)^3 = 1.5x the encoding work of abutting tiles (an overlap of 0.5 would cost 8x)."""


def aligned_tile(volume_size: tuple[int, ...], wanted: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    """Tile sizes that are multiples of 8 x factor, so that tiles overlapping by 1/8 start on factor multiples;
    the whole axis where the volume is not larger than that."""
    tile = []
    for size, want, factor in zip(volume_size, wanted, factors):
        step = 8 * factor
        aligned = max(step, want // step * step)
        tile.append(size if aligned >= size else aligned)
    return tuple(tile)


def _pad_to(x: torch.Tensor, minimum: tuple[int, int, int], factors: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (D, H, W) at the high end to at least `minimum` and to multiples of `factors`.

    Zero is hu_min after scaling: the fill ctv2v.data.clips uses beyond a volume's edge.
    """
    target = [math.ceil(max(s, m) / f) * f for s, m, f in zip(x.shape, minimum, factors)]
    return F.pad(x, [0, target[2] - x.shape[2], 0, target[1] - x.shape[1], 0, target[0] - x.shape[0]])


@torch.no_grad()
def encode_volume(vae: ClipVAE, volume: torch.Tensor, tile: tuple[int, int, int]) -> torch.Tensor:
    """(D, H, W) [0, 1] volume, sizes multiples of the factors -> (C, D/fd, H/fs, W/fs) latent.

    Encoded in overlapping tiles whose sizes and origins are multiples of the factors, blended with Gaussian
    weights (MONAI sliding-window inference), so that memory stays bounded for whole CT volumes.
    """
    bad = [s for s, f in zip(volume.shape, vae.factors) if s % f]
    if bad:
        raise TrainingError(f"encode_volume: volume shape {tuple(volume.shape)} is not a multiple of {vae.factors}")
    roi = aligned_tile(tuple(volume.shape), tile, vae.factors)
    latent = sliding_window_inference(volume[None, None], roi_size=roi, sw_batch_size=1, predictor=vae.encode,
                                      overlap=CACHE_TILE_OVERLAP, mode="gaussian")
    return latent[0]


def encode_training_volumes(
    vae: ClipVAE, volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, device: torch.device
) -> list[VolumeLatents]:
    """Encode every training volume's thin and thick series once (the frozen phase's latent cache).

    Under DDP every rank encodes every volume: one pass over the training set, small next to an epoch, and no
    rank has to wait for or receive another's latents.
    """
    vae.eval()
    tile = (4 * clip.frames, 4 * clip.height, 4 * clip.width)
    cached = []
    for volume in volumes:
        k = volume.thick.factor
        thin = _pad_to(torch.from_numpy(intensity.to_unit(volume.thin)),
                       (clip.frames, clip.height, clip.width), vae.factors)
        thick = _pad_to(torch.from_numpy(intensity.to_unit(volume.thick.array)),
                        (clip.frames // k, clip.height, clip.width), vae.factors)
        cached.append(VolumeLatents(
            volume.volume_id,
            encode_volume(vae, thin.to(device), tile).cpu(),
            encode_volume(vae, thick.to(device), (tile[0] // k, tile[1], tile[2])).cpu(),
            tuple(volume.thin.shape),
            volume.thick.array.shape[0],
        ))
        log.info("latent cache: %s thin %s -> latent %s", volume.volume_id, tuple(volume.thin.shape),
                 tuple(cached[-1].thin.shape))
    return cached


class LatentClips(Dataset):
    """Aligned latent crops of cached volumes: `clips_per_volume` per volume and epoch, like TrainClips.

    Item i of epoch e comes from volume i // clips_per_volume at an origin drawn from a generator seeded by
    (seed, e, i); in image voxels the origin is a multiple of (thick factor x depth factor, spatial factor,
    spatial factor) and obeys TrainClips' bounds (the clip's thick slices exist; its thin slices too where
    the volume is long enough). No flips (see the module docstring).
    """

    def __init__(self, latents: list[VolumeLatents], clip: ClipConfig, factors: tuple[int, int, int],
                 thick_factor: int, seed: int):
        if not latents:
            raise TrainingError("the latent cache holds no training volume")
        depth_factor, spatial_factor, _ = factors
        self.step = (thick_factor * depth_factor, spatial_factor, spatial_factor)
        self.size = (clip.frames, clip.height, clip.width)
        bad = [f"{name}={s} (needs a multiple of {m})"
               for name, s, m in zip(("frames", "height", "width"), self.size, self.step) if s % m]
        if bad:
            raise TrainingError(f"data.clip: the latent cache needs clips aligned to the VAE's factors {factors} "
                                f"and the thick factor {thick_factor}: {', '.join(bad)}; change the clip size or "
                                "set training.latent_cache=false")
        self.latents, self.clips_per_volume, self.seed = latents, clip.clips_per_volume, seed
        self.factors, self.thick_factor = factors, thick_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops the dataset returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.latents) * self.clips_per_volume

    def origin(self, index: int) -> tuple[int, int, int]:
        """Item `index`'s crop origin in thin image voxels."""
        item = self.latents[index // self.clips_per_volume]
        (slices, rows, cols), k = item.thin_shape, self.thick_factor
        frames, height, width = self.size
        last = (max(min((item.thick_slices - frames // k) * k, slices - frames), 0), max(rows - height, 0),
                max(cols - width, 0))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        z, y, x = (int(rng.integers(0, end // step + 1)) * step for end, step in zip(last, self.step))
        return z, y, x

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.latents[index // self.clips_per_volume]
        z, y, x = self.origin(index)
        (fd, fs, _), (t, h, w) = self.factors, self.size
        rows, cols = slice(y // fs, (y + h) // fs), slice(x // fs, (x + w) // fs)
        zk, tk = z // self.thick_factor, t // self.thick_factor
        return {"thin_latent": item.thin[:, z // fd:(z + t) // fd, rows, cols],
                "thick_latent": item.thick[:, zk // fd:(zk + tk) // fd, rows, cols],
                "volume_id": item.volume_id, "origin": torch.tensor([z, y, x])}


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


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainJob:
    """Everything one run of the loop needs. `states` are the modules whose weights a checkpoint holds."""

    name: str
    """`vae`, `frozen` or `full`: names checkpoints and MLflow metrics."""
    config: RunConfig
    objective: nn.Module
    param_groups: list[dict[str, Any]]
    train_set: Dataset
    epochs: int
    batch_size: int
    warmup_steps: int
    states: dict[str, nn.Module]
    out_dir: Path
    device: torch.device
    precision: Precision
    dist_info: Distributed = field(default_factory=Distributed)
    ema_of: nn.Module | None = None
    """The module to keep an exponential moving average of (training.ema_decay), e.g. the denoiser."""
    validate: Callable[[nn.Module | None], dict[str, float]] | None = None
    """Called on rank 0 every val_every_epochs epochs with the EMA (or None); returns metrics incl. `val_loss`."""
    on_best: Callable[[nn.Module | None], None] | None = None
    """Called on rank 0 when val_loss improves, with the EMA (or None): saves the best model."""
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    find_unused_parameters: bool = False
    """DDP: some trainable parameters get no gradient (e.g. the VAE decoder when full.recon_weight is 0)."""
    resume: bool = False
    num_workers: int = 0


@dataclass
class TrainResult:
    global_step: int
    epochs: int
    last_metrics: dict[str, float]
    best_val_loss: float | None
    ema: nn.Module | None
    seconds: float
    clips_per_second: float


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/warmup to 1, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _gather_rng(dist_info: Distributed) -> list[dict[str, Any]]:
    state = capture_rng()
    if not dist_info.enabled:
        return [state]
    gathered: list[Any] = [None] * dist_info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_loop(job: TrainJob) -> TrainResult:
    """Run (or resume) one training job to its last epoch; returns the final step count and metrics."""
    settings: TrainingConfig = job.config.training
    rank, main = job.dist_info.rank, job.dist_info.is_main
    trainable = [p for group in job.param_groups for p in group["params"]]
    if not trainable:
        raise TrainingError(f"{job.name}: no trainable parameters")
    optimizer = torch.optim.AdamW(job.param_groups, weight_decay=settings.weight_decay)
    sampler = ShardSampler(len(job.train_set), seed=job.config.seed, rank=rank, world_size=job.dist_info.world_size)
    batches_per_epoch = math.ceil(sampler.per_rank / job.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum_steps)
    total_steps = job.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(job.warmup_steps, total_steps))
    scaler = job.precision.scaler(job.device)
    ema = None
    if settings.ema_decay is not None and job.ema_of is not None:
        ema = AveragedModel(job.ema_of, multi_avg_fn=get_ema_multi_avg_fn(settings.ema_decay), use_buffers=True)
    objective: nn.Module = job.objective
    if job.dist_info.enabled:
        device_ids = [job.device.index] if job.device.type == "cuda" else None
        objective = DistributedDataParallel(job.objective, device_ids=device_ids,
                                            find_unused_parameters=job.find_unused_parameters)

    checkpoints = job.out_dir / "checkpoints"
    progress = Progress()
    latest = latest_checkpoint(checkpoints)
    if latest is not None and not job.resume:
        raise TrainingError(f"{checkpoints} already holds {latest.name}: pass --resume to continue it, "
                            "or give an empty output folder")
    if latest is not None:
        payload = load_checkpoint(latest, phase=job.name, config=job.config, world_size=job.dist_info.world_size)
        for name, module in job.states.items():
            module.load_state_dict(payload["states"][name])
        optimizer.load_state_dict(payload["states"]["optimizer"])
        scheduler.load_state_dict(payload["states"]["scheduler"])
        scaler.load_state_dict(payload["states"]["scaler"])
        if ema is not None:
            ema.load_state_dict(payload["states"]["ema"])
        restore_rng(payload["rng"][rank])
        progress = payload["progress"]
        log.info("%s: resumed from %s at epoch %d, batch %d, step %d", job.name, latest, progress.epoch,
                 progress.batch_in_epoch, progress.global_step)
    elif job.resume:
        log.info("%s: --resume given but %s holds no checkpoint; starting from step 0", job.name, checkpoints)

    def write_checkpoint() -> None:
        rng = _gather_rng(job.dist_info)
        if main:
            states = {name: module.state_dict() for name, module in job.states.items()}
            states.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                          scaler=scaler.state_dict())
            if ema is not None:
                states["ema"] = ema.state_dict()
            save_checkpoint(checkpoints, phase=job.name, config=job.config, progress=progress, states=states,
                            rng_per_rank=rng)

    loader_generator = torch.Generator()
    loader = DataLoader(job.train_set, batch_size=job.batch_size, sampler=sampler, num_workers=job.num_workers,
                        generator=loader_generator, persistent_workers=False)
    clips_per_step = job.batch_size * job.dist_info.world_size
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    clips_seen = 0
    job.objective.train()
    for epoch in range(progress.epoch, job.epochs):
        job.train_set.set_epoch(epoch)
        sampler.set_position(epoch, progress.batch_in_epoch * job.batch_size)
        loader_generator.manual_seed(job.config.seed + epoch)
        batches = iter(loader)
        epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=progress.batch_in_epoch // settings.grad_accum_steps,
                   desc=f"{job.name} {epoch + 1}/{job.epochs}", disable=not main, dynamic_ncols=True)
        while progress.batch_in_epoch < batches_per_epoch:
            step_start = time.perf_counter()
            group = min(settings.grad_accum_steps, batches_per_epoch - progress.batch_in_epoch)
            parts_sum: dict[str, float] = {}
            loss_sum = 0.0
            for micro in range(group):
                batch = _to_device(next(batches), job.device)
                sync = micro == group - 1 or not job.dist_info.enabled
                with contextlib.nullcontext() if sync else objective.no_sync():
                    with job.precision.autocast(job.device):
                        loss, parts = objective(batch)
                    scaler.scale(loss / group).backward()
                loss_sum += float(loss.detach()) / group
                for key, value in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + float(value) / group
            if not math.isfinite(loss_sum):
                raise TrainingError(f"{job.name}: loss is {loss_sum} at epoch {epoch}, step {progress.global_step}")
            scaler.unscale_(optimizer)
            max_norm = settings.grad_clip if settings.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            lrs = {f"{job.name}/lr/{param_group.get('name', index)}": param_group["lr"]
                   for index, param_group in enumerate(optimizer.param_groups)}
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(job.ema_of)
            progress.batch_in_epoch += group
            progress.global_step += 1
            clips_seen += group * clips_per_step
            epoch_loss += loss_sum
            epoch_steps += 1
            metrics = {f"{job.name}/loss": loss_sum, f"{job.name}/grad_norm": grad_norm,
                       f"{job.name}/clips_per_s": group * clips_per_step / (time.perf_counter() - step_start)}
            metrics.update({f"{job.name}/{key}": value for key, value in parts_sum.items()}, **lrs)
            if main and job.log_metrics is not None:
                job.log_metrics(metrics, progress.global_step)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            bar.update(1)
            if progress.global_step % settings.checkpoint_every_steps == 0:
                write_checkpoint()
        bar.close()
        if epoch_steps:
            log.info("%s epoch %d/%d: mean loss %.5f over %d steps, %.1f s", job.name, epoch + 1, job.epochs,
                     epoch_loss / epoch_steps, epoch_steps, time.perf_counter() - epoch_start)
        if job.validate is not None and ((epoch + 1) % settings.val_every_epochs == 0 or epoch + 1 == job.epochs):
            if main:
                job.objective.eval()
                val = job.validate(ema)
                job.objective.train()
                if job.log_metrics is not None:
                    job.log_metrics({f"{job.name}/{k}": v for k, v in val.items()}, progress.global_step)
                log.info("%s epoch %d validation: %s", job.name, epoch + 1,
                         ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                if progress.best_val_loss is None or val["val_loss"] < progress.best_val_loss:
                    progress.best_val_loss = val["val_loss"]
                    if job.on_best is not None:
                        job.on_best(ema)
                metrics.update({f"{job.name}/{k}": v for k, v in val.items()})
            if job.dist_info.enabled:
                dist.barrier()
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        write_checkpoint()
    seconds = time.perf_counter() - started
    return TrainResult(progress.global_step, job.epochs, metrics, progress.best_val_loss, ema, seconds,
                       clips_seen / seconds if seconds > 0 else 0.0)


# ------------------------------------------------------------------------------------ step plumbing
@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank, device and precision."""

    dist_info: Distributed
    device: torch.device
    precision: Precision


def runtime_from_env(config: RunConfig) -> Runtime:
    """Rank from torchrun's environment, device from config.device (cuda:LOCAL_RANK), precision from the config."""
    dist_info = distributed_from_env()
    device = select_device(config.device, dist_info.local_rank)
    if device.type == "cpu":
        # Subnormal floats (they appear in the VAE/denoiser on real CT clips) run ~15x slower on x86 CPUs;
        # measured here: one smoke-size frozen epoch 19 s -> 1.2 s. Flushing them to zero changes nothing else.
        torch.set_flush_denormal(True)
    return Runtime(dist_info, device, resolve_precision(config.training.precision, device))
