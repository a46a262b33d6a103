"""What the training loop optimizes: modules whose forward turns a batch into (loss, parts)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ctv2v.models.vae import ClipVAE, kl_divergence

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- objectives
class DiffusionObjective(nn.Module):
    """The diffusion loss of a batch of image clips (`thin`, `thick`) or of cached latents."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "thin_latent" in batch:
            return self.model.loss_from_latents(batch["thick_latent"], batch["thin_latent"])
        return self.model.loss(batch["thick"], batch["thin"], interp=batch.get("interp"))


class ScratchVAEObjective(nn.Module):
    """L1 reconstruction of a posterior sample plus kl_weight x KL per latent value, on thin clips.

    The KL is a mean over latent values (not a sum: summed over as many values as voxels, it held the
    posterior std near 1, so the decoder trained on noise while every later use decodes the mean), and the
    log-variance starts small (ScratchAutoencoder), so the deterministic path encode() -> decode() is what trains.
    """

    def __init__(self, vae: ClipVAE, kl_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clip = batch["thin"]
        mu, logvar = self.vae.encode_posterior(clip)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = self.vae.decode(z * self.vae.latent_scale, tuple(clip.shape[2:]))
        l1 = F.l1_loss(recon.float(), clip.float())
        kl = kl_divergence(mu.float(), logvar.float())
        return l1 + self.kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach(),
                                          "posterior_std": torch.exp(0.5 * logvar.detach()).mean()}
