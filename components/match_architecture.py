"""Pipeline step `match-architecture`: MAISI's VAE checkpoint -> a VAE artifact, loaded 100% strictly.

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

Same command line in the pipeline and a local or docker rerun:
    ctv2v match --config resolved-config.yaml --checkpoint CHECKPOINT --data DATA --out OUT
"""


import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ctv2v.remote.fetch import CheckpointFetchError, checkpoint_file, read_record
from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import load_split_volumes
from ctv2v.train.device import select_device
from ctv2v.files import atomic_write_text, sha256_file
from ctv2v.intensity import Intensity
from ctv2v.models.maisi import ArchitectureMismatchError, CheckpointFormatError, load_maisi_checkpoint
from ctv2v.train.validation import fixed_val_clips
from ctv2v.models.vae import MaisiVAE, compute_latent_scale, save_vae_artifact
from components.base import step_component

log = logging.getLogger(__name__)

REPORT_NAME = "match-report.json"
NOT_APPLICABLE = "not applicable (stand-in weights)"


class ReconstructionCheckError(RuntimeError):
    """The loaded VAE reconstructs CT clips worse than vae.maisi.recon_psnr_floor_db."""


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


@torch.no_grad()
def reconstruction_check(vae: MaisiVAE, config: RunConfig, data_dir: Path, weights: str, partial: bool,
                         device: torch.device) -> dict[str, Any]:
    """Encode + decode vae.maisi.recon_check_clips val clips; PSNR in HU over the intensity window vs the floor."""
    maisi, window = config.vae.maisi, config.data.intensity
    result: dict[str, Any] = {
        "hu_window": [window.hu_min, window.hu_max], "floor_db": maisi.recon_psnr_floor_db, "split": "val",
        "clip": [config.data.clip.frames, config.data.clip.height, config.data.clip.width],
        "encode_mode": maisi.encode_mode, "latent": "posterior mean",
    }
    if weights == "stand-in":
        log.warning("reconstruction check: NOT APPLICABLE (stand-in weights): random weights reconstruct nothing")
        return {**result, "status": NOT_APPLICABLE, "psnr_db": None, "per_clip_psnr_db": []}
    intensity = Intensity.from_config(window)
    clips = fixed_val_clips(load_split_volumes(data_dir, config, "val"), config.data.clip, intensity,
                            maisi.recon_check_clips)
    vae.eval()
    squared, voxels, per_clip = 0.0, 0, []
    for clip in clips:
        thin = clip["thin"].to(device)
        recon = vae.decode(vae.encode(thin), size=tuple(thin.shape[2:])).clamp(0.0, 1.0)
        error = float((recon.double() - thin.double()).pow(2).sum())
        squared, voxels = squared + error, voxels + thin.numel()
        per_clip.append(_psnr(error / thin.numel()))
    # On [0, 1] scaled from the HU window, PSNR with peak 1 equals PSNR in HU with the window width as peak.
    psnr = _psnr(squared / voxels)
    passed = psnr >= maisi.recon_psnr_floor_db
    status = ("passed" if passed else "FAILED") + (" (PARTIAL load)" if partial else "")
    result.update(status=status, psnr_db=psnr, per_clip_psnr_db=per_clip, clips=len(clips))
    message = (f"{'PARTIAL: ' if partial else ''}reconstruction PSNR {psnr:.2f} dB in HU over "
               f"[{window.hu_min:g}, {window.hu_max:g}] on {len(clips)} val clip(s), floor "
               f"{maisi.recon_psnr_floor_db:g} dB: {status}")
    if not passed:
        raise ReconstructionCheckError(
            f"{message}. Check the intensity normalization: MAISI's VAE expects HU clipped to [-1000, 1000] and "
            "scaled to [0, 1] (data.intensity, ctv2v.intensity); feeding [-1, 1] gave an earlier prototype "
            "7-13 dB. Also check that the checkpoint is MAISI's CT VAE"
        )
    log.info(message)
    return result


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def match_architecture_step(config: RunConfig, checkpoint_path: Path, out_dir: Path, data_dir: Path,
                            pipeline_run_id: str | None = None) -> dict[str, Any]:
    """Load the checkpoint strictly into AutoencoderKlMaisi, check it, write the VAE artifact, log to MLflow."""
    maisi = config.vae.maisi
    checkpoint_path = Path(checkpoint_path)
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
    recon = reconstruction_check(vae, config, data_dir, weights, report.partial, device)

    train_clips = TrainClips(load_split_volumes(data_dir, config, "train"), config.data.clip,
                             Intensity.from_config(config.data.intensity), config.seed)
    train_clips.set_epoch(0)
    count = min(config.vae.latent_scale_clips, len(train_clips))
    scale = compute_latent_scale(vae, (train_clips[i]["thin"][None].to(device) for i in range(count)))
    log.info("%slatent scale 1/std(z) = %.6g from %d training clip(s)", tag, scale, count)

    load = "PARTIAL" if report.partial else "strict"
    summary = {
        "weights": weights, "load": load, "loaded": f"{report.loaded}/{report.total}",
        "recon_check": recon, "latent_scale": scale, "latent_scale_clips": count, "checkpoint": str(path),
        "checkpoint_sha256": _checkpoint_sha256(checkpoint_path, path),
    }
    out_dir = Path(out_dir)
    save_vae_artifact(vae, out_dir, weights=weights,
                      extra={"match": report.to_dict(), **{k: v for k, v in summary.items() if k != "weights"}})
    atomic_write_text(out_dir / REPORT_NAME, json.dumps({**summary, "match": report.to_dict()}, indent=2) + "\n")
    write_resolved(config, out_dir)
    log.info("%sVAE artifact (%s weights, %s load, %s tensors) written to %s", tag, weights, load,
             summary["loaded"], out_dir)
    _track(config, out_dir, summary, pipeline_run_id)
    return summary


def _track(config: RunConfig, out_dir: Path, summary: dict[str, Any], pipeline_run_id: str | None) -> None:
    """A nested MLflow run for the step: load (strict / PARTIAL) as a tag, the match report as an artifact."""
    from ctv2v.tracking.runs import Tracker, new_pipeline_run_id

    loaded, total = (int(n) for n in summary["loaded"].split("/"))
    metrics = {"match/loaded_fraction": loaded / total, "match/latent_scale": summary["latent_scale"]}
    if summary["recon_check"]["psnr_db"] is not None:
        metrics["match/recon_psnr_db"] = summary["recon_check"]["psnr_db"]
    tracker = Tracker(config.tracking, out_dir)
    with tracker.step_run("match-architecture", pipeline_run_id or new_pipeline_run_id(), variant="pretrained",
                          phase="match", weights=summary["weights"],
                          tags={"load": summary["load"], "recon_check": summary["recon_check"]["status"]}):
        tracker.log_params({"match.loaded": summary["loaded"], "match.checkpoint_sha256": summary["checkpoint_sha256"]})
        tracker.log_metrics(metrics, 0)
        tracker.log_artifact(out_dir / REPORT_NAME, "match")


def _checkpoint_sha256(checkpoint_path: Path, path: Path) -> str:
    """The sha256 from the fetch record when there is one, else computed from the file."""
    try:
        return read_record(checkpoint_path).sha256
    except CheckpointFetchError:
        return sha256_file(path)


# ---------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the `match` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("match", help="load MAISI's VAE checkpoint 100%% strictly; write the VAE artifact")
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint file, or the output folder of fetch-checkpoint")
    parser.add_argument("--data", required=True, type=Path,
                        help="prepared dataset folder (manifest + cache): val clips for the reconstruction check, "
                             "train clips for the latent scale")
    parser.add_argument("--out", required=True, type=Path, help="output folder: vae.pt, vae.json, match-report.json")
    parser.add_argument("--allow-partial", action="store_true",
                        help="shorthand for --set vae.maisi.allow_partial=true: load a partial match, labelled PARTIAL")
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")
    parser.set_defaults(func=_match_command)


def _match_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    if args.allow_partial:
        args.overrides = [*args.overrides, "vae.maisi.allow_partial=true"]
    config = config_from_args(args)
    try:
        summary = match_architecture_step(config, args.checkpoint, args.out, args.data, args.pipeline_run_id)
    except (ArchitectureMismatchError, CheckpointFormatError, CheckpointFetchError, ReconstructionCheckError,
            FileNotFoundError) as exc:
        print(f"ctv2v match: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- KFP
@step_component
def match_architecture_op(config_yaml: str, pipeline_run_id: str, data: Input[Dataset], checkpoint: Input[Model],
                          vae: Output[Model], metrics: Output[Metrics]):
    """Load MAISI's VAE checkpoint strictly; `vae` receives the VAE artifact, `metrics` the match and PSNR.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder.
    """
    import logging
    from pathlib import Path

    from components.match_architecture import match_architecture_step
    from ctv2v.config_io import config_from_text

    # The match report is logged; without this, INFO lines would not reach the pod's log.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "data_dir" not in data.metadata:
        raise ValueError(f"data artifact {data.uri}: metadata has no 'data_dir' (expected prepare-data's manifest)")
    config = config_from_text(config_yaml, "config_yaml", ["variant=pretrained"])
    summary = match_architecture_step(config, Path(checkpoint.path), Path(vae.path), Path(data.metadata["data_dir"]),
                                      pipeline_run_id)
    loaded, total = (int(n) for n in summary["loaded"].split("/"))
    metrics.log_metric("maisi_tensors_loaded_fraction", loaded / total)
    metrics.log_metric("latent_scale", summary["latent_scale"])
    if summary["recon_check"]["psnr_db"] is not None:
        metrics.log_metric("recon_psnr_db", summary["recon_check"]["psnr_db"])
    vae.metadata.update({"weights": summary["weights"], "load": summary["load"], "loaded": summary["loaded"],
                         "recon_check": summary["recon_check"]["status"]})
