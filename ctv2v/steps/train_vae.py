"""Step `train-vae`: the `main` variant's scratch VAE, trained on the train split's thin clips.

The loss is L1 reconstruction of a sampled latent plus vae.scratch.kl_weight x KL, optimized by the same
resumable, DDP-capable loop as the diffusion phases. Afterwards the latent scale 1/std(z) is estimated on
vae.latent_scale_clips training clips, and OUT receives the VAE artifact in ctv2v.models.vae's save_vae_artifact
format (the same format the match-architecture step writes for MAISI's VAE), so `train --vae OUT` reads either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import MANIFEST_FILE, load_split_volumes
from ctv2v.intensity import Intensity
from ctv2v.models.vae import VAE_META_FILE, VAE_WEIGHTS_FILE, ScratchVAE, compute_latent_scale, save_vae_artifact
from ctv2v.steps.context import claim_output_folder_once, distributed_runtime, seed_per_rank, tracked_step
from ctv2v.train.loop import TrainJob, train_loop
from ctv2v.train.objectives import ScratchVAEObjective
from ctv2v.train.resume import check_training_folder
from ctv2v.train.validation import vae_val_clips, validate_vae

VAE_FILES = (VAE_WEIGHTS_FILE, VAE_META_FILE, "resolved-config.yaml")
"""The VAE artifact without the checkpoints (which stay in the step's folder): what a KFP artifact receives."""


@dataclass(frozen=True)
class TrainedVAE:
    """How the scratch VAE's training went; the latent scale and the artifact folder only on rank 0."""

    global_step: int
    clips_per_second: float
    metrics: dict[str, float]
    """The last logged value of each training and validation metric."""
    latent_scale: float | None
    vae_dir: Path | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the metrics at top level."""
        data: dict[str, Any] = {"global_step": self.global_step, "clips_per_second": self.clips_per_second,
                                **self.metrics}
        if self.vae_dir is not None:
            data.update(latent_scale=self.latent_scale, vae_dir=str(self.vae_dir))
        return data


def train_vae_step(
    config: RunConfig, data_dir: Path, out_dir: Path, resume: bool = False, pipeline_run_id: str | None = None
) -> TrainedVAE:
    """Train the scratch VAE and write its artifact (vae.pt, vae.json) into `out_dir`."""
    if config.variant != "main":
        raise ValueError(f"train-vae trains the `main` variant's scratch VAE; variant is {config.variant!r} "
                         "(the `pretrained` variant gets its VAE from fetch-checkpoint + match-architecture)")
    scratch = config.vae.scratch
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    check_training_folder(out_dir, resume)
    with distributed_runtime(config) as runtime:
        main = runtime.dist_info.is_main
        vae = ScratchVAE.from_config(scratch).to(runtime.device)
        seed_per_rank(config, runtime)
        intensity = Intensity.from_config(config.data.intensity)
        train_clips = TrainClips(load_split_volumes(data_dir, config, "train"), config.data.clip, intensity,
                                 config.seed)
        val_clips = vae_val_clips(load_split_volumes(data_dir, config, "val"), config)
        claim_output_folder_once(out_dir, runtime)  # inputs read and checked: the folder is this run's from here
        with tracked_step(config.tracking, out_dir, "train-vae", pipeline_run_id, main=main, variant=config.variant,
                          weights="scratch") as tracker:
            tracker.log_params(flatten(config))
            tracker.log_input_manifest(data_dir / MANIFEST_FILE, context="training")
            job = TrainJob(
                name="vae", config=config, objective=ScratchVAEObjective(vae, scratch.kl_weight),
                param_groups=[{"params": list(vae.parameters()), "lr": scratch.lr, "name": "vae"}],
                train_set=train_clips, epochs=scratch.epochs, batch_size=scratch.batch_size, warmup_steps=0,
                states={"vae": vae}, out_dir=out_dir, device=runtime.device, precision=runtime.precision,
                dist_info=runtime.dist_info,
                validate=lambda _ema: validate_vae(vae, val_clips, config, runtime.device, runtime.precision),
                log_metrics=tracker.log_metrics, resume=resume, num_workers=config.data.num_workers,
            )
            result = train_loop(job)
            latent_scale = None
            if main:
                train_clips.set_epoch(0)
                count = min(config.vae.latent_scale_clips, len(train_clips))
                latent_scale = compute_latent_scale(vae, (train_clips[i]["thin"][None].to(runtime.device)
                                                          for i in range(count)))
                save_vae_artifact(vae, out_dir, weights="scratch",
                                  extra={"trained_steps": result.global_step, "latent_scale_clips": count})
                write_resolved(config, out_dir)  # last: a step that fails leaves no config posing as output
                tracker.log_metrics({"vae/latent_scale": latent_scale}, result.global_step)
                tracker.log_artifact(out_dir / VAE_META_FILE, "vae")
                tracker.log_artifact(out_dir / VAE_WEIGHTS_FILE, "vae")
        return TrainedVAE(result.global_step, result.clips_per_second, result.last_metrics, latent_scale,
                          out_dir if main else None)
