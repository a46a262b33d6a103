"""The training loop, shared by the scratch VAE and both diffusion phases.

One loop (nanoGPT style): get a batch, forward under autocast, backward through the GradScaler, accumulate
`training.grad_accum_steps` micro-batches, unscale and clip, step, schedule, update the EMA, log,
checkpoint. What is optimized is an `Objective` (ctv2v.train.objectives): a module whose forward turns a batch
into (loss, parts); under torchrun it is wrapped in DistributedDataParallel, so gradient averaging covers
exactly the parameters that require gradients (the denoiser; the VAE too once it is unfrozen).

Exact resume: the data order is a pure function of (seed, epoch, rank) and every dataset item a pure
function of (seed, epoch, index); model, optimizer, scaler, scheduler, EMA and every process's RNG states
are checkpointed (ctv2v.train.resume) at optimizer-step boundaries together with the position in the epoch,
and the DataLoader gets its own generator so that creating an iterator never draws from the global RNG.
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

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ctv2v.train.resume import Progress, capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from ctv2v.config import RunConfig, TrainingConfig
from ctv2v.device import Distributed, Precision, distributed_from_env, resolve_precision, select_device

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or continue as configured; the message says which setting or file."""


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
    """Called on rank 0 when validation improves (best_validation), with the EMA (or None): saves the best model."""
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    find_unused_parameters: bool = False
    """DDP: some trainable parameters get no gradient (e.g. the VAE decoder when full.recon_weight is 0)."""
    resume: bool = False
    num_workers: int = 0


SELECTION = {"val_psnr_db_synthesized": 1, "val_loss": -1}
"""The validation metrics that pick best-model, in order of preference, and their sign (1: higher is better)."""


def best_validation(val: dict[str, float]) -> str:
    """The metric that picks best-model from a validation: the whole val views' PSNR on synthesized slices where
    they are scored (training.val_scored_views), which is what evaluate measures (the clip val_loss rose over the
    frozen phase while that PSNR rose: bench_quality, issue 18); else the val loss."""
    for metric in SELECTION:
        if metric in val:
            return metric
    raise ValueError(f"validation returned {sorted(val)}: none of {list(SELECTION)}, which pick best-model")


@dataclass
class TrainResult:
    global_step: int
    epochs: int
    last_metrics: dict[str, float]
    best_val_metric: str | None
    best_val: float | None
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
    world_size = job.dist_info.world_size
    if len(job.train_set) < world_size:
        raise TrainingError(f"{job.name}: {len(job.train_set)} training clips for {world_size} processes (nodes x GPUs "
                            "per node): some processes would only repeat the others' clips; use fewer")
    sampler = ShardSampler(len(job.train_set), seed=job.config.seed, rank=rank, world_size=world_size)
    batches_per_epoch = math.ceil(sampler.per_rank / job.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum_steps)
    total_steps = job.epochs * steps_per_epoch
    if main:
        # The global batch grows with nodes and GPUs while the learning rate stays as configured (PhaseConfig.lr
        # says how to rescale it); stating both lets runs on different node counts be compared.
        log.info("%s: global batch %d = micro-batch %d x accumulation %d x %d processes; %d clips, each process "
                 "reads its own 1/%d shard; lr as configured", job.name,
                 job.batch_size * settings.grad_accum_steps * world_size, job.batch_size, settings.grad_accum_steps,
                 world_size, len(job.train_set), world_size)
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
                # One line: where it diverged, the last finite loss, and the checkpoint kept (nothing is deleted).
                last = metrics.get(f"{job.name}/loss")
                last_finite = "none in this run" if last is None else f"{last:.6g} (step {progress.global_step})"
                kept = latest_checkpoint(checkpoints)
                raise TrainingError(f"{job.name}: diverged at epoch {epoch + 1}/{job.epochs}, step "
                                    f"{progress.global_step + 1}: loss is {loss_sum}; last finite loss {last_finite}; "
                                    + (f"last checkpoint kept: {kept}" if kept else "no checkpoint written yet"))
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
                metric = best_validation(val)
                if (progress.best_val is None or progress.best_val_metric != metric
                        or SELECTION[metric] * (val[metric] - progress.best_val) > 0):
                    progress.best_val_metric, progress.best_val = metric, val[metric]
                    if job.on_best is not None:
                        job.on_best(ema)
                metrics.update({f"{job.name}/{k}": v for k, v in val.items()})
            if job.dist_info.enabled:
                dist.barrier()
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        write_checkpoint()
    seconds = time.perf_counter() - started
    return TrainResult(progress.global_step, job.epochs, metrics, progress.best_val_metric, progress.best_val, ema,
                       seconds, clips_seen / seconds if seconds > 0 else 0.0)


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
