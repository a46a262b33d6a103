"""The trained-model artifact, the one strict state-dict loader, and the vocabulary that labels weights.

The trained-model artifact is a folder:
    vae/                  the VAE in ctv2v.models.vae's save_vae_artifact format (fine-tuned weights after `full`)
    denoiser.pt           the denoiser's state dict (the EMA weights when EMA was on), loaded strictly
    model.json            format, phase, variant, VAE weights label, which denoiser weights, the config
    resolved-config.yaml

Three vocabularies name the two branches. They answer different questions, so each is kept, defined once:
- variant (`RunConfig.variant`, ctv2v.config.VARIANTS): which pipeline branch runs: `main` or `pretrained`;
- VAE kind (`ClipVAE.kind`, vae.json's `kind`, VAE_KINDS): which network the VAE is: `scratch` (ScratchVAE)
  or `maisi` (MaisiVAE); a variant implies its VAE kind (VAE_KIND_OF_VARIANT);
- weights kind (vae.json's `weights`, the MLflow `weights` tag, WEIGHTS_KINDS): where the VAE's weights come
  from: `pretrained` (MAISI's published ones), `scratch` (trained here) or `stand-in` (random values in MAISI's
  layout, for offline runs). The `pretrained` variant runs with `pretrained` or `stand-in` weights
  (vae.maisi.weights), the `main` variant with `scratch` ones.
A weights label is a weights kind, optionally followed by ", <detail>" ("scratch, fine-tuned (full phase)").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.files import atomic_torch_save, atomic_write_text, load_torch_file
from ctv2v.models.maisi import match_report

log = logging.getLogger(__name__)
MODEL_FORMAT = "ctv2v-trained-model/1"


class CheckpointError(ValueError):
    """A checkpoint or trained-model folder is missing, malformed or does not fit the config; names the file."""


# ------------------------------------------------------------------------------------------ vocabulary
VAE_KINDS = ("scratch", "maisi")
VAE_KIND_OF_VARIANT = {"main": "scratch", "pretrained": "maisi"}
"""`main` trains a ScratchVAE, `pretrained` loads MAISI's VAE (keys: ctv2v.config.VARIANTS)."""
WEIGHTS_KINDS = ("pretrained", "scratch", "stand-in")
WEIGHTS_DISPLAY = {
    "pretrained": "pretrained (MAISI CT VAE weights)",
    "scratch": "VAE trained from scratch",
    "stand-in": "stand-in (random MAISI-layout weights)",
}
"""How each weights kind is shown to readers: stand-in weights are always named as such."""
FINE_TUNED = "fine-tuned (full phase)"
"""The detail of a VAE label after the full phase fine-tuned it."""


class WeightsLabelError(ValueError):
    """A VAE weights label is missing or does not start with one of WEIGHTS_KINDS."""


def _split_label(label: str | None) -> tuple[str, str]:
    """(kind, detail) of a weights label; detail is "" when there is none."""
    if not label:
        raise WeightsLabelError(f"the VAE carries no weights label (expected one of {', '.join(WEIGHTS_KINDS)})")
    kind, _, detail = label.partition(",")
    kind = kind.strip()
    if kind not in WEIGHTS_KINDS:
        raise WeightsLabelError(f"VAE weights label {label!r}: expected one of {', '.join(WEIGHTS_KINDS)}, "
                                "optionally followed by ', <detail>'")
    return kind, detail.strip()


def check_weights_label(label: str | None) -> str:
    """`label` itself when it is a weights kind optionally followed by ', <detail>'; else WeightsLabelError."""
    _split_label(label)
    return label


def weights_kind(label: str | None) -> str:
    """The weights kind of a label ('scratch, fine-tuned (full phase)' -> 'scratch')."""
    return _split_label(label)[0]


def weights_display(label: str | None) -> str:
    """How a weights label is shown to readers; stand-in weights are always named as such."""
    kind, detail = _split_label(label)
    return f"{WEIGHTS_DISPLAY[kind]}, {detail}" if detail else WEIGHTS_DISPLAY[kind]


# ------------------------------------------------------------------------------------- strict loading
def load_state_strictly(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """`module.load_state_dict(state, strict=True)`, with an error naming the file and every mismatched key."""
    report = match_report(module, dict(state))
    if not report.complete:
        shapes = [f"{k} (file {v['checkpoint']}, network {v['model']})" for k, v in report.shape_mismatched.items()]
        raise CheckpointError(
            f"{source}: state dict does not match the architecture ({report.loaded}/{report.total} tensors): "
            f"{len(report.missing)} missing key(s) {report.missing}, {len(report.unexpected)} unexpected key(s) "
            f"{report.unexpected}, {len(shapes)} shape mismatch(es) {shapes}"
        )
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------ trained model
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
    from ctv2v.models.vae import save_vae_artifact

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


def load_trained_model(model_dir: Path, config: RunConfig):
    """The VideoToVideoDiffusion of a trained-model folder, built from `config` and loaded strictly."""
    from ctv2v.models.v2v import build_model
    from ctv2v.models.vae import load_vae_artifact

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

