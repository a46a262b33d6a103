"""Pipeline steps `train --phase frozen` and `train --phase full`: the latent diffusion model on thick -> thin clips.

frozen: the VAE (from --vae) is frozen and out of the optimizer; the denoiser trains on latents encoded once
(training.latent_cache) or per batch. full: starts from the frozen phase's trained model (--init), unfreezes
the VAE with its own learning rate (training.full.vae_lr_multiplier) and adds the L1 reconstruction term.
Both write the trained-model folder (ctv2v.checkpointing) to OUT/model, the best-by-val-loss one to
OUT/best-model, and resumable checkpoints to OUT/checkpoints. Run under `torchrun --nproc_per_node N` for DDP.
"""

import argparse
import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from kfp.dsl import Dataset, Input, Model, Output

from components.base import step_component
from ctv2v.models.artifacts import CheckpointError, load_trained_model, save_trained_model, weights_kind
from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import load_split_volumes
from ctv2v.train.device import process_group
from ctv2v.intensity import Intensity
from ctv2v.data.latents import LatentClips, encode_training_volumes
from ctv2v.train.loop import TrainingError, TrainJob, runtime_from_env, train_loop
from ctv2v.train.objectives import DiffusionObjective
from ctv2v.train.validation import fixed_val_clips, validate_diffusion

log = logging.getLogger(__name__)

PHASES = ("frozen", "full")
MODEL_DIR = "model"
BEST_MODEL_DIR = "best-model"


def load_vae(vae_dir: Path, config: RunConfig):
    """The VAE artifact at `vae_dir`; a missing or broken artifact is one clear error, never a random VAE."""
    from ctv2v.models.vae import load_vae_artifact

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
    from ctv2v.models.v2v import build_model

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
) -> dict[str, Any]:
    """Train one phase; returns a summary (steps, final metrics, the trained-model folder)."""
    from ctv2v.tracking.runs import Tracker, new_pipeline_run_id

    runtime = runtime_from_env(config)
    out_dir = Path(out_dir)
    with process_group(runtime.dist_info, runtime.device):
        main = runtime.dist_info.is_main
        torch.manual_seed(config.seed)
        model = build_phase_model(config, phase, vae_dir, init_dir).to(runtime.device)
        if main:
            write_resolved(config, out_dir)
        # Same initial weights on every rank (seeded above); different noise streams from here on.
        torch.manual_seed(config.seed + runtime.dist_info.rank)
        intensity = Intensity.from_config(config.data.intensity)
        train_volumes = load_split_volumes(data_dir, config, "train")
        val_clips = fixed_val_clips(load_split_volumes(data_dir, config, "val"), config.data.clip, intensity,
                                    config.training.val_clips)
        settings = config.training.frozen if phase == "frozen" else config.training.full
        if phase == "frozen" and config.training.latent_cache:
            latents = encode_training_volumes(model.vae, train_volumes, config.data.clip, intensity, runtime.device)
            train_set = LatentClips(latents, config.data.clip, model.vae.factors, config.data.thick.factor, config.seed)
        else:
            train_set = TrainClips(train_volumes, config.data.clip, intensity, config.seed)
        multiplier = config.training.full.vae_lr_multiplier if phase == "full" else 0.0
        groups = model.param_groups(settings.lr, multiplier, config.training.weight_decay)
        vae_params = {id(p) for p in model.vae.parameters()}
        in_optimizer = sum(1 for g in groups for p in g["params"] if id(p) in vae_params)
        if phase == "frozen" and in_optimizer:
            raise TrainingError(f"frozen phase: {in_optimizer} VAE parameters are in the optimizer")
        if phase == "full" and multiplier > 0 and not in_optimizer:
            raise TrainingError("full phase: the VAE is not in the optimizer")
        states = {"denoiser": model.denoiser} if phase == "frozen" else {"denoiser": model.denoiser, "vae": model.vae}

        tracker = Tracker(config.tracking, out_dir) if main else None
        run = (tracker.step_run(f"train-{phase}", pipeline_run_id or new_pipeline_run_id(), variant=config.variant,
                                phase=phase, weights=weights_kind(model.vae.weights_label))
               if tracker is not None else contextlib.nullcontext())
        with run:
            if tracker is not None:
                tracker.log_params(flatten(config))
            job = TrainJob(
                name=phase, config=config, objective=DiffusionObjective(model), param_groups=groups,
                train_set=train_set, epochs=settings.epochs, batch_size=settings.batch_size,
                warmup_steps=settings.warmup_steps, states=states, out_dir=out_dir, device=runtime.device,
                precision=runtime.precision, dist_info=runtime.dist_info, ema_of=model.denoiser,
                validate=lambda ema: validate_diffusion(model, val_clips, ema, config, runtime.device,
                                                        runtime.precision),
                on_best=lambda ema: save_trained_model(model, out_dir / BEST_MODEL_DIR, config, ema, phase=phase),
                log_metrics=tracker.log_metrics if tracker is not None else None,
                find_unused_parameters=phase == "full" and config.training.full.recon_weight == 0,
                resume=resume, num_workers=config.data.num_workers,
            )
            result = train_loop(job)
            summary: dict[str, Any] = {"phase": phase, "global_step": result.global_step,
                                       "clips_per_second": result.clips_per_second,
                                       "best_val_loss": result.best_val_loss, **result.last_metrics}
            if main:
                model_dir = save_trained_model(model, out_dir / MODEL_DIR, config, result.ema, phase=phase)
                summary["model_dir"] = str(model_dir)
                tracker.log_metrics({f"{phase}/clips_per_s_mean": result.clips_per_second}, result.global_step)
                tracker.log_artifacts(model_dir, MODEL_DIR)
                if (out_dir / BEST_MODEL_DIR).is_dir():
                    tracker.log_artifacts(out_dir / BEST_MODEL_DIR, BEST_MODEL_DIR)
        return summary


# ---------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("train", help="train the diffusion model: --phase frozen (VAE frozen) or full")
    add_config_arguments(parser)
    parser.add_argument("--phase", required=True, choices=PHASES)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--vae", required=True, type=Path, help="VAE artifact folder (train-vae / match-architecture)")
    parser.add_argument("--init", type=Path, default=None, help="--phase full: the frozen phase's output folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (checkpoints, model, best-model)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, if any")
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")
    parser.set_defaults(func=_train_command)


def _train_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    summary = train_step(config_from_args(args), args.phase, args.data, args.vae, args.init, args.out,
                         resume=args.resume, pipeline_run_id=args.pipeline_run_id)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- KFP
def workspace_out_dir(workspace_root: str, pipeline_run_id: str, variant: str, phase: str) -> Path:
    """Where a pipeline run's phase trains on the workspace volume: it survives pod restarts, so retries resume."""
    from ctv2v.data.prepared import run_workspace

    return run_workspace(workspace_root, pipeline_run_id) / f"train-{phase}-{variant}"


def export_models(out_dir: Path, artifact_dir: Path) -> None:
    """Copy model/ and best-model/ (not the checkpoints) from the step's output folder into its KFP artifact."""
    for name in (MODEL_DIR, BEST_MODEL_DIR):
        if (out_dir / name).is_dir():
            shutil.copytree(out_dir / name, artifact_dir / name, dirs_exist_ok=True)


@step_component
def train_op(
    config_yaml: str,
    variant: str,
    phase: str,
    workspace_root: str,
    pipeline_run_id: str,
    data: Input[Dataset],
    vae: Input[Model],
    model: Output[Model],
    init: Optional[Input[Model]] = None,
):
    """Train one phase of `variant`; checkpoints stay on the workspace volume, `model` receives model/ and best-model/.

    `data` is prepare-data's manifest artifact (metadata `data_dir`); `init` is the frozen phase's `model`.
    """
    import logging
    from pathlib import Path

    from components.base import run_distributed
    from components.train import export_models, train_step, workspace_out_dir
    from ctv2v.config_io import config_from_text, write_resolved

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "data_dir" not in data.metadata:
        raise ValueError(f"data artifact {data.uri}: metadata has no 'data_dir' (expected prepare-data's manifest)")
    config = config_from_text(config_yaml, "config_yaml", [f"variant={variant}"])
    out_dir = workspace_out_dir(workspace_root, pipeline_run_id, variant, phase)
    data_dir, init_dir = Path(data.metadata["data_dir"]), Path(init.path) if init is not None else None
    if config.cluster.gpus_per_step > 1:
        run_distributed(config.cluster.gpus_per_step, [
            "train", "--phase", phase, "--config", str(write_resolved(config, out_dir)), "--data", str(data_dir),
            "--vae", vae.path, *(["--init", str(init_dir)] if init_dir else []), "--out", str(out_dir),
            "--resume", "--pipeline-run-id", pipeline_run_id])
    else:
        train_step(config, phase, data_dir, Path(vae.path), init_dir, out_dir, resume=True,
                   pipeline_run_id=pipeline_run_id)
    export_models(out_dir, Path(model.path))
    model.metadata.update({"phase": phase, "variant": variant, "workspace_dir": str(out_dir)})
