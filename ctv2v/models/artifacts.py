"""The trained-model artifact: save and strict load (weights labels: ctv2v.models.weights).

The trained-model artifact is a folder:
    vae/                  the VAE in ctv2v.models.vae's save_vae_artifact format (fine-tuned weights after `full`)
    denoiser.pt           the denoiser's state dict (the EMA weights when EMA was on), loaded strictly
    model.json            format, phase, variant, VAE weights label, which denoiser weights, the config
    resolved-config.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.device import inference_memory_format
from ctv2v.files import atomic_torch_save, atomic_write_text, load_torch_file
from ctv2v.models.v2v import VideoToVideoDiffusion, build_model
from ctv2v.models.vae import load_vae_artifact, save_vae_artifact
from ctv2v.models.weights import FINE_TUNED, CheckpointError, load_state_strictly, weights_kind

log = logging.getLogger(__name__)
MODEL_FORMAT = "ctv2v-trained-model/1"


def save_trained_model(
    model: torch.nn.Module,
    out_dir: Path,
    config: RunConfig,
    ema: torch.nn.Module | None,
    *,
    phase: str,
    thick_spacing_mm: tuple[float, float] | None = None,
) -> Path:
    """Write the trained-model folder; the denoiser weights are `ema`'s when given (the ones to sample with).

    `thick_spacing_mm` is the (min, max) thick slice spacing of the training series: ctv2v predict refuses inputs
    far outside it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = model.vae
    fine_tuned = phase == "full"
    kind = weights_kind(vae.weights_label)
    vae_label = f"{kind}, {FINE_TUNED}" if fine_tuned else vae.weights_label
    save_vae_artifact(vae, out_dir / "vae", weights=kind, extra={"phase": phase, "fine_tuned": fine_tuned})
    denoiser_state = (ema.module if ema is not None else model.denoiser).state_dict()
    atomic_torch_save({k: v.detach().cpu() for k, v in denoiser_state.items()}, out_dir / "denoiser.pt")
    meta = {
        "format": MODEL_FORMAT,
        "phase": phase,
        "variant": config.variant,
        "vae_weights": vae_label,
        "denoiser_weights": f"ema (decay {config.training.ema_decay})" if ema is not None else "raw",
        "config": json.loads(config.model_dump_json()),
    }
    if thick_spacing_mm is not None:
        meta["thick_spacing_mm"] = [float(value) for value in thick_spacing_mm]
    write_resolved(config, out_dir)
    atomic_write_text(out_dir / "model.json", json.dumps(meta, indent=2) + "\n")
    log.info("trained model (%s phase, VAE: %s) -> %s", phase, vae_label, out_dir)
    return out_dir


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """model.json of a trained-model folder, checked for format."""
    meta_path = Path(model_dir) / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{model_dir}: not a trained-model folder (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    return meta


def load_trained_model(model_dir: Path, config: RunConfig) -> VideoToVideoDiffusion:
    """The VideoToVideoDiffusion of a trained-model folder, built from `config` and loaded strictly."""
    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    saved = RunConfig.model_validate(meta["config"])
    for section in ("variant", "denoiser", "diffusion"):
        if getattr(saved, section) != getattr(config, section):
            raise CheckpointError(
                f"{model_dir}/model.json: trained with {section}={getattr(saved, section)!r}, "
                f"but the config has {getattr(config, section)!r}"
            )
    # residual_decoding only changes how a sampled latent becomes an image: it may differ from training.
    for key in ("condition", "interpolation", "consistent_interpolation"):
        if getattr(saved.v2v, key) != getattr(config.v2v, key):
            raise CheckpointError(f"{model_dir}/model.json: trained with v2v.{key}={getattr(saved.v2v, key)!r}, "
                                  f"but the config has {getattr(config.v2v, key)!r}")
    vae = load_vae_artifact(model_dir / "vae", config.vae.maisi)
    vae.weights_label = meta["vae_weights"]
    model = build_model(config, vae)
    weights_path = model_dir / "denoiser.pt"
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing denoiser weights")
    state = load_torch_file(weights_path, "denoiser weights")
    load_state_strictly(model.denoiser, state, weights_path)
    return model


def load_model_for_inference(model_dir: Path, config: RunConfig, device: torch.device) -> VideoToVideoDiffusion:
    """load_trained_model on `device` in eval mode, its VAE in the layout that predicts fastest there."""
    model = load_trained_model(model_dir, config).to(device).eval()
    model.vae.to(memory_format=inference_memory_format(device))
    return model
