"""Steps `train --phase frozen` and `train --phase full`: the latent diffusion model on thick -> thin clips.

frozen: the VAE (from --vae) is frozen and out of the optimizer; the denoiser trains on latents encoded once
(training.latent_cache) or per batch. full: starts from the frozen phase's trained model (--init), unfreezes
the VAE with its own learning rate (training.full.vae_lr_multiplier) and adds the L1 reconstruction term.
Both write the trained-model folder (ctv2v.models.artifacts) to OUT/model, the best validated one to
OUT/best-model (by the whole val views' PSNR where they are scored, else by val_loss), and resumable checkpoints
to OUT/checkpoints. Under `torchrun --nproc_per_node N` it is DDP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved
from ctv2v.data.clips import TrainClips
from ctv2v.data.latents import LatentClips, encode_training_volumes
from ctv2v.data.prepared import MANIFEST_FILE, load_split_volumes
from ctv2v.intensity import Intensity
from ctv2v.models.artifacts import load_trained_model, save_trained_model
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import load_vae_artifact
from ctv2v.models.weights import CheckpointError, weights_kind
from ctv2v.steps.context import claim_output_folder_once, distributed_runtime, seed_per_rank, tracked_step
from ctv2v.train.loop import TrainingError, TrainJob, train_loop
from ctv2v.train.objectives import DiffusionObjective
from ctv2v.train.resume import CHECKPOINT_MODULES, check_training_folder
from ctv2v.train.validation import scored_val_views, val_clips_of, validate_diffusion

PHASES = ("frozen", "full")
MODEL_DIR = "model"
BEST_MODEL_DIR = "best-model"


@dataclass(frozen=True)
class TrainedPhase:
    """How one training phase went; the trained-model folder only on rank 0."""

    phase: str
    global_step: int
    clips_per_second: float
    best_val_metric: str | None
    """What picked best-model/ (whole val views' PSNR where scored, else val_loss); None: no validation ran."""
    best_val: float | None
    metrics: dict[str, float]
    """The last logged value of each training and validation metric."""
    model_dir: Path | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the metrics at top level."""
        data: dict[str, Any] = {"phase": self.phase, "global_step": self.global_step,
                                "clips_per_second": self.clips_per_second,
                                "best_val_metric": self.best_val_metric, "best_val": self.best_val,
                                **self.metrics}
        if self.model_dir is not None:
            data["model_dir"] = str(self.model_dir)
        return data


def load_vae(vae_dir: Path, config: RunConfig):
    """The VAE artifact at `vae_dir`; a missing or broken artifact is one clear error, never a random VAE."""
    vae_dir = Path(vae_dir)
    if not vae_dir.is_dir():
        raise CheckpointError(f"--vae {vae_dir}: VAE folder does not exist (run train-vae or match-architecture first)")
    try:
        return load_vae_artifact(vae_dir, config.vae.maisi)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"--vae {vae_dir}: not a usable VAE artifact: {exc}") from exc


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def build_phase_model(config: RunConfig, phase: str, vae_dir: Path, init_dir: Path | None):
    """The model a phase starts from: a new denoiser on the --vae VAE (frozen), or the frozen phase's model (full)."""
    if phase not in PHASES:
        raise ValueError(f"--phase must be one of {PHASES}, got {phase!r}")
    vae = load_vae(vae_dir, config)
    if phase == "frozen":
        if init_dir is not None:
            raise ValueError("--init is for --phase full (the frozen phase starts a new denoiser)")
        model = build_model(config, vae)
        model.freeze_vae()
        return model
    if init_dir is None:
        raise ValueError("--phase full needs --init: the frozen phase's output folder")
    model_dir = Path(init_dir) / MODEL_DIR
    model = load_trained_model(model_dir, config)
    if not _same_weights(model.vae, vae):
        raise CheckpointError(f"--init {model_dir}: its VAE differs from --vae {vae_dir}; the frozen phase must "
                              "have been trained on the same VAE")
    model.unfreeze_vae()
    return model


def train_step(
    config: RunConfig,
    phase: str,
    data_dir: Path,
    vae_dir: Path,
    init_dir: Path | None,
    out_dir: Path,
    resume: bool = False,
    pipeline_run_id: str | None = None,
) -> TrainedPhase:
    """Train one phase into `out_dir` (checkpoints, model/, best-model/)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    init_dir = None if init_dir is None else Path(init_dir)
    check_training_folder(out_dir, resume)
    with distributed_runtime(config) as runtime:
        main = runtime.dist_info.is_main
        model = build_phase_model(config, phase, vae_dir, init_dir).to(runtime.device)
        seed_per_rank(config, runtime)
        intensity = Intensity.from_config(config.data.intensity)
        train_volumes = load_split_volumes(data_dir, config, "train")
        val_volumes = load_split_volumes(data_dir, config, "val")
        val_clips = val_clips_of(val_volumes, config, model.interpolation)
        val_views = scored_val_views(val_volumes, config)
        thick_spacings = [volume.thick.spacing_mm for volume in train_volumes]
        thick_spacing_mm = (min(thick_spacings), max(thick_spacings))
        settings = config.training.frozen if phase == "frozen" else config.training.full
        if phase == "frozen" and config.training.latent_cache:
            latents = encode_training_volumes(model.vae, train_volumes, config.data.clip, intensity, runtime.device)
            train_set = LatentClips(latents, config.data.clip, model.vae.factors, config.data.thick.factor, config.seed)
        else:
            train_set = TrainClips(train_volumes, config.data.clip, intensity, config.seed, model.interpolation,
                                   config.data.augment, config.data.thick)
        multiplier = config.training.full.vae_lr_multiplier if phase == "full" else 0.0
        groups = model.param_groups(settings.lr, multiplier, config.training.weight_decay)
        vae_params = {id(p) for p in model.vae.parameters()}
        in_optimizer = sum(1 for g in groups for p in g["params"] if id(p) in vae_params)
        if phase == "frozen" and in_optimizer:
            raise TrainingError(f"frozen phase: {in_optimizer} VAE parameters are in the optimizer")
        if phase == "full" and multiplier > 0 and not in_optimizer:
            raise TrainingError("full phase: the VAE is not in the optimizer")
        states = {name: getattr(model, name) for name in CHECKPOINT_MODULES[phase]}

        claim_output_folder_once(out_dir, runtime)  # inputs read and checked: the folder is this run's from here
        weights = weights_kind(model.vae.weights_label)
        with tracked_step(config.tracking, out_dir, f"train-{phase}", pipeline_run_id, main=main,
                          variant=config.variant, phase=phase, weights=weights) as tracker:
            tracker.log_params(flatten(config))
            # The training data as the run's dataset input (the manifest's sha256 is its digest).
            tracker.log_input_manifest(data_dir / MANIFEST_FILE, context="training")
            job = TrainJob(
                name=phase, config=config, objective=DiffusionObjective(model), param_groups=groups,
                train_set=train_set, epochs=settings.epochs, batch_size=settings.batch_for(config.variant),
                warmup_steps=settings.warmup_steps, states=states, out_dir=out_dir, device=runtime.device,
                precision=runtime.precision, dist_info=runtime.dist_info, ema_of=model.denoiser,
                validate=lambda ema: validate_diffusion(model, val_clips, val_views, ema, config, runtime.device,
                                                        runtime.precision),
                on_best=lambda ema: save_trained_model(model, out_dir / BEST_MODEL_DIR, config, ema, phase=phase,
                                                        thick_spacing_mm=thick_spacing_mm),
                log_metrics=tracker.log_metrics,
                find_unused_parameters=phase == "full" and config.training.full.recon_weight == 0,
                resume=resume, num_workers=config.data.num_workers,
            )
            result = train_loop(job)
            model_dir = None
            if main:
                model_dir = save_trained_model(model, out_dir / MODEL_DIR, config, result.ema, phase=phase,
                                               thick_spacing_mm=thick_spacing_mm)
                write_resolved(config, out_dir)  # last: a step that fails leaves no config posing as output
                tracker.log_metrics({f"{phase}/clips_per_s_mean": result.clips_per_second}, result.global_step)
                tracker.log_artifacts(model_dir, MODEL_DIR)
                if (out_dir / BEST_MODEL_DIR).is_dir():
                    tracker.log_artifacts(out_dir / BEST_MODEL_DIR, BEST_MODEL_DIR)
        return TrainedPhase(phase, result.global_step, result.clips_per_second, result.best_val_metric,
                            result.best_val, result.last_metrics, model_dir)
