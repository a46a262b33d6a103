"""Step `match-architecture`: MAISI's VAE checkpoint -> a VAE artifact, loaded 100% strictly.

The architecture is inferred from the checkpoint's tensor names and shapes (ctv2v.models.maisi.infer_arch), the
network is built from it and every tensor must match: the match report names each missing, unexpected or
mis-shaped tensor, and anything short of 100% fails the step unless vae.maisi.allow_partial is true, in
which case every output and log line says PARTIAL. Then:
- reconstruction check: a few validation clips are encoded and decoded and the PSNR is computed in HU over the
  data.intensity window (MAISI's contract: [-1000, 1000] scaled to [0, 1]); below vae.maisi.recon_psnr_floor_db
  the step fails (the classic cause is a wrong intensity normalization). With stand-in weights the check is
  "not applicable (stand-in weights)", never passed;
- latent scale: 1/std of the posterior means of vae.latent_scale_clips training clips (the same clips the
  scratch VAE's train-vae step uses), stored in the artifact.
OUT receives vae.pt + vae.json (ctv2v.models.vae's artifact format), match-report.json and resolved-config.yaml.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import load_split_volumes
from ctv2v.device import resolve_precision, select_device
from ctv2v.evaluate.metrics import psnr
from ctv2v.files import atomic_write_text, sha256_file
from ctv2v.intensity import Intensity
from ctv2v.models.maisi import ArchitectureMismatchError, MatchReport, load_maisi_checkpoint
from ctv2v.models.vae import MaisiVAE, compute_latent_scale, save_vae_artifact
from ctv2v.remote.fetch import CheckpointFetchError, checkpoint_file, read_record
from ctv2v.steps.context import tracked_step
from ctv2v.train.validation import fixed_val_clips, vae_val_clips, validate_vae

log = logging.getLogger(__name__)

REPORT_NAME = "match-report.json"
OUTPUT_FILES = ("vae.pt", "vae.json", REPORT_NAME, "resolved-config.yaml")
"""What the step writes into OUT (save_vae_artifact's two files, the report, the config) and its KFP component
exports into the `vae` artifact; MLflow's pending journal and run file stay in OUT."""
NOT_APPLICABLE = "not applicable (stand-in weights)"


class ReconstructionCheckError(RuntimeError):
    """The loaded VAE reconstructs CT clips worse than vae.maisi.recon_psnr_floor_db."""


@dataclass(frozen=True)
class ReconstructionCheck:
    """Encode + decode of a few val clips: PSNR in HU over the intensity window, against the floor."""

    hu_window: list[float]
    floor_db: float
    clip: list[int]
    encode_mode: str
    status: str
    """passed / FAILED (either may add " (PARTIAL load)"), or NOT_APPLICABLE for stand-in weights."""
    psnr_db: float | None
    per_clip_psnr_db: list[float] = field(default_factory=list)
    clips: int = 0
    split: str = "val"
    latent: str = "posterior mean"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class MatchSummary:
    """What match-architecture made of a checkpoint: the match, the checks, the latent scale."""

    weights: str
    """pretrained or stand-in."""
    match: MatchReport
    recon_check: ReconstructionCheck
    latent_scale: float
    latent_scale_clips: int
    checkpoint: Path
    checkpoint_sha256: str
    ceiling: dict[str, float]
    """The VAE's ceiling decode(encode(thin)) on the val clips, with the interpolation's scores on the same clips
    (validate_vae's val_* and val_interp_* keys, as train-vae logs them for the scratch VAE)."""

    @property
    def load(self) -> str:
        """`PARTIAL` when an incomplete match was loaded (vae.maisi.allow_partial), else `strict`."""
        return "PARTIAL" if self.match.partial else "strict"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (match-report.json): `loaded` spelled `130/130`, the full match report under `match`."""
        return {
            "weights": self.weights, "load": self.load, "loaded": f"{self.match.loaded}/{self.match.total}",
            "recon_check": self.recon_check.to_dict(), "latent_scale": self.latent_scale,
            "latent_scale_clips": self.latent_scale_clips, "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.checkpoint_sha256, "ceiling": self.ceiling, "match": self.match.to_dict(),
        }


def _weights_label(config: RunConfig, checkpoint_path: Path) -> str:
    """`pretrained` or `stand-in`, from the config, cross-checked with the fetch record when there is one."""
    declared = config.vae.maisi.weights
    try:
        recorded = read_record(checkpoint_path).weights
    except CheckpointFetchError:
        return declared
    if recorded != declared:
        raise ValueError(f"{checkpoint_path}: the fetch record says weights {recorded!r} but vae.maisi.weights is "
                         f"{declared!r}; refetch the checkpoint or fix the config")
    return declared


def _as_volume(clip: torch.Tensor) -> np.ndarray:
    """A (1, 1, frames, height, width) clip on [0, 1] as a float64 (slice, row, col) array."""
    return clip[0, 0].double().cpu().numpy()


@torch.no_grad()
def reconstruction_check(vae: MaisiVAE, config: RunConfig, val_volumes: list[Preprocessed], weights: str,
                         partial: bool, device: torch.device) -> ReconstructionCheck:
    """Encode + decode vae.maisi.recon_check_clips val clips; PSNR in HU over the intensity window vs the floor."""
    maisi, window = config.vae.maisi, config.data.intensity
    settings = {"hu_window": [window.hu_min, window.hu_max], "floor_db": maisi.recon_psnr_floor_db,
                "clip": [config.data.clip.frames, config.data.clip.height, config.data.clip.width],
                "encode_mode": maisi.encode_mode}
    if weights == "stand-in":
        log.warning("reconstruction check: NOT APPLICABLE (stand-in weights): random weights reconstruct nothing")
        return ReconstructionCheck(**settings, status=NOT_APPLICABLE, psnr_db=None)
    intensity = Intensity.from_config(window)
    clips = fixed_val_clips(val_volumes, config.data.clip, intensity, maisi.recon_check_clips)
    vae.eval()
    targets, recons = [], []
    for clip in clips:
        thin = clip["thin"].to(device)
        targets.append(_as_volume(thin))
        recons.append(_as_volume(vae.decode(vae.encode(thin), size=tuple(thin.shape[2:])).clamp(0.0, 1.0)))
    # On [0, 1] scaled from the HU window, PSNR with data range 1 equals PSNR in HU with the window width as range.
    per_clip = [psnr(recon, target, 1.0) for recon, target in zip(recons, targets)]
    pooled = psnr(np.concatenate(recons), np.concatenate(targets), 1.0)
    passed = pooled >= maisi.recon_psnr_floor_db
    status = ("passed" if passed else "FAILED") + (" (PARTIAL load)" if partial else "")
    message = (f"{'PARTIAL: ' if partial else ''}reconstruction PSNR {pooled:.2f} dB in HU over "
               f"[{window.hu_min:g}, {window.hu_max:g}] on {len(clips)} val clip(s), floor "
               f"{maisi.recon_psnr_floor_db:g} dB: {status}")
    if not passed:
        raise ReconstructionCheckError(
            f"{message}. Check the intensity normalization: MAISI's VAE expects HU clipped to [-1000, 1000] and "
            "scaled to [0, 1] (data.intensity, ctv2v.intensity); feeding [-1, 1] gave an earlier prototype "
            "7-13 dB. Also check that the checkpoint is MAISI's CT VAE"
        )
    log.info(message)
    return ReconstructionCheck(**settings, status=status, psnr_db=pooled, per_clip_psnr_db=per_clip,
                               clips=len(clips))


@torch.no_grad()
def vae_ceiling(vae: MaisiVAE, config: RunConfig, val_volumes: list[Preprocessed], device: torch.device
                ) -> dict[str, float]:
    """decode(encode(thin)) PSNR/SSIM on training.val_clips val clips next to the interpolation the model starts
    from, scored as train-vae scores the scratch VAE (ctv2v.train.validation.validate_vae)."""
    vae.eval()
    return validate_vae(vae, vae_val_clips(val_volumes, config), config, device,
                        resolve_precision(config.training.precision, device))


def match_architecture_step(config: RunConfig, checkpoint_path: Path, out_dir: Path, data_dir: Path,
                            pipeline_run_id: str | None = None) -> MatchSummary:
    """Load the checkpoint strictly into AutoencoderKlMaisi, check it, write the VAE artifact, log to MLflow."""
    maisi = config.vae.maisi
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    weights = _weights_label(config, checkpoint_path)
    path = checkpoint_file(checkpoint_path)
    try:
        model, report = load_maisi_checkpoint(
            path, allow_partial=maisi.allow_partial, num_splits=maisi.num_splits, dim_split=maisi.dim_split,
            norm_float16=maisi.norm_float16, use_checkpointing=maisi.use_checkpointing,
        )
    except ArchitectureMismatchError as exc:
        if exc.report is not None:
            log.error("%s", exc.report.summary())
        raise
    tag = "PARTIAL: " if report.partial else ""
    log.log(logging.WARNING if report.partial else logging.INFO, "%s", report.summary())
    if weights == "stand-in":
        log.warning("STAND-IN weights: %s holds random values with MAISI's layout, not NVIDIA's weights", path)

    device = select_device(config.device)
    vae = MaisiVAE(report.arch, maisi)
    vae.autoencoder.load_state_dict(model.state_dict(), strict=True)
    vae.to(device)
    val_volumes = load_split_volumes(data_dir, config, "val")
    recon = reconstruction_check(vae, config, val_volumes, weights, report.partial, device)
    ceiling = vae_ceiling(vae, config, val_volumes, device)
    log.info("%sVAE ceiling on %d val clip(s) (%s weights), synthesized slices: decode(encode(thin)) %.2f dB "
             "vs %s interpolation %.2f dB", tag, config.training.val_clips, weights,
             ceiling["val_psnr_db_synthesized"], config.v2v.interpolation,
             ceiling["val_interp_psnr_db_synthesized"])

    train_clips = TrainClips(load_split_volumes(data_dir, config, "train"), config.data.clip,
                             Intensity.from_config(config.data.intensity), config.seed)
    train_clips.set_epoch(0)
    count = min(config.vae.latent_scale_clips, len(train_clips))
    scale = compute_latent_scale(vae, (train_clips[i]["thin"][None].to(device) for i in range(count)))
    log.info("%slatent scale 1/std(z) = %.6g from %d training clip(s)", tag, scale, count)

    summary = MatchSummary(weights=weights, match=report, recon_check=recon, latent_scale=scale,
                           latent_scale_clips=count, checkpoint=path,
                           checkpoint_sha256=_checkpoint_sha256(checkpoint_path, path), ceiling=ceiling)
    record = summary.to_dict()
    save_vae_artifact(vae, out_dir, weights=weights, extra={k: v for k, v in record.items() if k != "weights"})
    atomic_write_text(out_dir / REPORT_NAME, json.dumps(record, indent=2) + "\n")
    write_resolved(config, out_dir)
    log.info("%sVAE artifact (%s weights, %s load, %s tensors) written to %s", tag, weights, summary.load,
             record["loaded"], out_dir)
    _track(config, out_dir, summary, pipeline_run_id)
    return summary


def _track(config: RunConfig, out_dir: Path, summary: MatchSummary, pipeline_run_id: str | None) -> None:
    """A nested MLflow run for the step: load (strict / PARTIAL) as a tag, the match report as an artifact."""
    metrics = {"match/loaded_fraction": summary.match.loaded_fraction, "match/latent_scale": summary.latent_scale}
    if summary.recon_check.psnr_db is not None:
        metrics["match/recon_psnr_db"] = summary.recon_check.psnr_db
    metrics.update({f"vae/{key}": value for key, value in summary.ceiling.items()})
    with tracked_step(config.tracking, out_dir, "match-architecture", pipeline_run_id, variant="pretrained",
                      phase="match", weights=summary.weights,
                      tags={"load": summary.load, "recon_check": summary.recon_check.status}) as tracker:
        tracker.log_params({"match.loaded": f"{summary.match.loaded}/{summary.match.total}",
                            "match.checkpoint_sha256": summary.checkpoint_sha256})
        tracker.log_metrics(metrics, 0)
        tracker.log_artifact(out_dir / REPORT_NAME, "match")


def _checkpoint_sha256(checkpoint_path: Path, path: Path) -> str:
    """The sha256 from the fetch record when there is one, else computed from the file."""
    try:
        return read_record(checkpoint_path).sha256
    except CheckpointFetchError:
        return sha256_file(path)
