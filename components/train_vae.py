"""Pipeline step `train-vae`: the `main` variant's scratch VAE, trained on the train split's thin clips.

The loss is L1 reconstruction of a sampled latent plus vae.scratch.kl_weight x KL, optimized by the same
resumable, DDP-capable loop as the diffusion phases. Afterwards the latent scale 1/std(z) is estimated on
vae.latent_scale_clips training clips, and OUT receives the VAE artifact in ctv2v.models.vae's save_vae_artifact
format (the same format the match-architecture step writes for MAISI's VAE), so `train --vae OUT` reads either.
"""

import argparse
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from kfp.dsl import Dataset, Input, Model, Output

from components.base import step_component
from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import load_split_volumes
from ctv2v.train.device import process_group
from ctv2v.intensity import Intensity
from ctv2v.train.loop import TrainJob, runtime_from_env, train_loop
from ctv2v.train.objectives import ScratchVAEObjective
from ctv2v.train.validation import fixed_val_clips, validate_vae
from ctv2v.models.vae import ScratchVAE, compute_latent_scale, save_vae_artifact

log = logging.getLogger(__name__)


def train_vae_step(
    config: RunConfig, data_dir: Path, out_dir: Path, resume: bool = False, pipeline_run_id: str | None = None
) -> dict[str, Any]:
    """Train the scratch VAE and write its artifact (vae.pt, vae.json) into `out_dir`; returns a summary."""
    from ctv2v.tracking.runs import Tracker, new_pipeline_run_id

    if config.variant != "main":
        raise ValueError(f"train-vae trains the `main` variant's scratch VAE; variant is {config.variant!r} "
                         "(the `pretrained` variant gets its VAE from fetch-checkpoint + match-architecture)")
    scratch = config.vae.scratch
    runtime = runtime_from_env(config)
    out_dir = Path(out_dir)
    with process_group(runtime.dist_info, runtime.device):
        main = runtime.dist_info.is_main
        if main:
            write_resolved(config, out_dir)
        torch.manual_seed(config.seed)
        vae = ScratchVAE.from_config(scratch).to(runtime.device)
        torch.manual_seed(config.seed + runtime.dist_info.rank)
        intensity = Intensity.from_config(config.data.intensity)
        train_clips = TrainClips(load_split_volumes(data_dir, config, "train"), config.data.clip, intensity,
                                 config.seed)
        val_clips = fixed_val_clips(load_split_volumes(data_dir, config, "val"), config.data.clip, intensity,
                                    config.training.val_clips)
        tracker = Tracker(config.tracking, out_dir) if main else None
        run = (tracker.step_run("train-vae", pipeline_run_id or new_pipeline_run_id(), variant=config.variant,
                                weights="scratch")
               if tracker is not None else contextlib.nullcontext())
        with run:
            if tracker is not None:
                tracker.log_params(flatten(config))
            job = TrainJob(
                name="vae", config=config, objective=ScratchVAEObjective(vae, scratch.kl_weight),
                param_groups=[{"params": list(vae.parameters()), "lr": scratch.lr, "name": "vae"}],
                train_set=train_clips, epochs=scratch.epochs, batch_size=scratch.batch_size, warmup_steps=0,
                states={"vae": vae}, out_dir=out_dir, device=runtime.device, precision=runtime.precision,
                dist_info=runtime.dist_info,
                validate=lambda _ema: validate_vae(vae, val_clips, config, runtime.device, runtime.precision),
                log_metrics=tracker.log_metrics if tracker is not None else None,
                resume=resume, num_workers=config.data.num_workers,
            )
            result = train_loop(job)
            summary: dict[str, Any] = {"global_step": result.global_step, "clips_per_second": result.clips_per_second,
                                       **result.last_metrics}
            if main:
                train_clips.set_epoch(0)
                count = min(config.vae.latent_scale_clips, len(train_clips))
                scale = compute_latent_scale(vae, (train_clips[i]["thin"][None].to(runtime.device)
                                                   for i in range(count)))
                save_vae_artifact(vae, out_dir, weights="scratch",
                                  extra={"trained_steps": result.global_step, "latent_scale_clips": count})
                summary.update(latent_scale=scale, vae_dir=str(out_dir))
                tracker.log_metrics({"vae/latent_scale": scale}, result.global_step)
                tracker.log_artifact(out_dir / "vae.json", "vae")
                tracker.log_artifact(out_dir / "vae.pt", "vae")
        return summary


# ---------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the `train-vae` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("train-vae", help="train the scratch VAE (variant main); OUT becomes a VAE artifact")
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: vae.pt, vae.json, checkpoints/")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, if any")
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")
    parser.set_defaults(func=_train_vae_command)


def _train_vae_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    summary = train_vae_step(config_from_args(args), args.data, args.out, resume=args.resume,
                             pipeline_run_id=args.pipeline_run_id)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- KFP
VAE_FILES = ("vae.pt", "vae.json", "resolved-config.yaml")
"""What the KFP artifact receives: the VAE artifact without the checkpoints, which stay on the workspace."""


@step_component
def train_vae_op(config_yaml: str, workspace_root: str, pipeline_run_id: str, data: Input[Dataset],
                 vae: Output[Model]):
    """Train the scratch VAE on the workspace volume (retries resume there); `vae` receives the VAE artifact.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder.
    """
    import json
    import logging
    import shutil
    from pathlib import Path

    from components.base import run_distributed
    from components.train_vae import VAE_FILES, train_vae_step
    from ctv2v.config_io import config_from_text, write_resolved
    from ctv2v.data.prepared import run_workspace

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "data_dir" not in data.metadata:
        raise ValueError(f"data artifact {data.uri}: metadata has no 'data_dir' (expected prepare-data's manifest)")
    config = config_from_text(config_yaml, "config_yaml", ["variant=main"])
    out_dir = run_workspace(workspace_root, pipeline_run_id) / "train-vae-main"
    data_dir = Path(data.metadata["data_dir"])
    if config.cluster.gpus_per_step > 1:
        run_distributed(config.cluster.gpus_per_step, [
            "train-vae", "--config", str(write_resolved(config, out_dir)), "--data", str(data_dir),
            "--out", str(out_dir), "--resume", "--pipeline-run-id", pipeline_run_id])
    else:
        train_vae_step(config, data_dir, out_dir, resume=True, pipeline_run_id=pipeline_run_id)
    Path(vae.path).mkdir(parents=True, exist_ok=True)
    for name in VAE_FILES:
        shutil.copyfile(out_dir / name, Path(vae.path) / name)
    written = json.loads((out_dir / "vae.json").read_text())
    vae.metadata.update({"weights": "scratch", "latent_scale": written["latent_scale"],
                         "workspace_dir": str(out_dir)})
