"""The vocabulary that labels VAEs and their weights, and the one strict state-dict loader.

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

from collections.abc import Mapping
from pathlib import Path

import torch

from ctv2v.models.maisi import match_report


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
