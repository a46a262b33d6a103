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
        return self.model.loss(batch["thick"], batch["thin"])


class ScratchVAEObjective(nn.Module):
    """L1 reconstruction of a sampled latent plus kl_weight x KL, on thin clips (the scratch VAE's training)."""

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
        return l1 + self.kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}
