"""VideoToVideoDiffusion: a clip VAE, a thick-conditioned latent denoiser and the diffusion process, kept apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctv2v.config import RunConfig
from ctv2v.data.interpolation import Interpolation
from ctv2v.models.weights import VAE_KIND_OF_VARIANT
from ctv2v.models.denoiser import Denoiser
from ctv2v.models.diffusion import Diffusion
from ctv2v.models.vae import ClipVAE, check_clip


class VideoToVideoDiffusion(nn.Module):
    """Thick clip (B, 1, T/k, H, W) -> thin clip (B, 1, T, H, W), both in [0, 1], through the VAE's latent space.

    Training has two phases. Frozen: the VAE is fixed (eval mode, no gradients, not in the optimizer) and the
    denoiser learns on (possibly cached) latents. Full: the VAE is fine-tuned too, and an L1 reconstruction
    term on the VAE keeps its latent space from collapsing under the diffusion loss alone.

    The image-space interpolation of the thick clip on the thin grid (`interp`, same shape as the thin clip)
    can condition the denoiser (`condition='interpolation'`), be the flow's source (diffusion.source) and
    anchor the output (`residual_decoding`); see ctv2v.config.V2VConfig.
    """

    def __init__(self, vae: ClipVAE, denoiser: Denoiser, diffusion: Diffusion, thick_factor: int,
                 recon_weight: float, sample_steps: int, condition: str = "thick", residual_decoding: bool = False,
                 interpolation: Interpolation = Interpolation("cubic"), image_loss_weight: float = 0.0):
        super().__init__()
        if denoiser.latent_channels != vae.latent_channels:
            raise ValueError(f"denoiser works on {denoiser.latent_channels} latent channels, "
                             f"the VAE makes {vae.latent_channels}")
        self.vae = vae
        self.denoiser = denoiser
        self.diffusion = diffusion
        self.thick_factor = thick_factor
        self.recon_weight = recon_weight
        self.image_loss_weight = image_loss_weight
        self.sample_steps = sample_steps
        self.condition = condition
        self.residual_decoding = residual_decoding
        self.interpolation_spec = interpolation
        self.vae_frozen = False
        self.freeze_vae()

    # ----------------------------------------------------------------------------------------- VAE phase
    def freeze_vae(self) -> None:
        """Frozen phase: the VAE in eval mode with requires_grad False."""
        self.vae_frozen = True
        self.vae.eval()
        self.vae.requires_grad_(False)

    def unfreeze_vae(self) -> None:
        """Full fine-tuning: the VAE trains with the denoiser."""
        self.vae_frozen = False
        self.vae.train(self.training)
        self.vae.requires_grad_(True)

    def train(self, mode: bool = True) -> "VideoToVideoDiffusion":
        """Like nn.Module.train, but a frozen VAE stays in eval mode."""
        super().train(mode)
        if self.vae_frozen:
            self.vae.eval()
        return self

    def param_groups(self, lr: float, vae_lr_multiplier: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: weight decay on weight matrices/kernels only; a VAE group only when it is unfrozen."""
        parts: list[tuple[str, nn.Module, float]] = [("denoiser", self.denoiser, lr)]
        if not self.vae_frozen:
            parts.append(("vae", self.vae, lr * vae_lr_multiplier))
        groups = []
        for name, module, group_lr in parts:
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay})
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    # ----------------------------------------------------------------------------------------- training
    def check_pair(self, thick: torch.Tensor, thin: torch.Tensor) -> None:
        """Raise ValueError unless `thin` has thick_factor slices per `thick` slice over the same batch and crop."""
        check_clip("thick", thick)
        check_clip("thin", thin)
        b, _, n, h, w = thick.shape
        if thin.shape[0] != b or thin.shape[3:] != thick.shape[3:] or thin.shape[2] != n * self.thick_factor:
            raise ValueError(
                f"thin clip {tuple(thin.shape)} does not match thick clip {tuple(thick.shape)}: expected "
                f"({b}, 1, {n * self.thick_factor}, {h}, {w}) for thick factor {self.thick_factor}"
            )

    @property
    def interpolation(self) -> Interpolation | None:
        """The interpolation whose clips training and sampling need (`interp`), or None if unused."""
        uses = self.condition == "interpolation" or self.diffusion.config.source == "interpolation" \
            or self.residual_decoding
        return self.interpolation_spec if uses else None

    def input_latents(self, thick: torch.Tensor, interp: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(condition latent, flow source latent or None, interpolation latent or None) of a clip's inputs."""
        if self.interpolation is not None:
            if interp is None:
                raise ValueError("this model uses the interpolated clip (v2v.condition, diffusion.source or "
                                 "v2v.residual_decoding): pass `interp`")
            check_clip("interp", interp)
            interp_latent = self.vae.encode(interp)
        else:
            interp_latent = None
        condition = interp_latent if self.condition == "interpolation" else self.vae.encode(thick)
        source = interp_latent if self.diffusion.config.source == "interpolation" else None
        return condition, source, interp_latent

    def loss(self, thick: torch.Tensor, thin: torch.Tensor, generator: torch.Generator | None = None, *,
             interp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss on a clip pair: diffusion loss, plus image_loss_weight * MSE of the image the prediction
        decodes to, plus recon_weight * L1 reconstruction when unfrozen."""
        self.check_pair(thick, thin)
        if interp is not None and interp.shape != thin.shape:
            raise ValueError(f"interpolated clip {tuple(interp.shape)} differs from the thin clip {tuple(thin.shape)}")
        vae_grad = torch.is_grad_enabled() and not self.vae_frozen
        with torch.set_grad_enabled(vae_grad):
            thin_latent = self.vae.encode(thin)
            condition, source, interp_latent = self.input_latents(thick, interp)
        loss, parts, x0_estimate = self._latent_loss(condition, thin_latent, generator, source)
        if self.image_loss_weight > 0:
            image = self.decode_output(x0_estimate, tuple(thin.shape[2:]), interp, interp_latent, vae_grad)
            image_mse = F.mse_loss(image, thin.float())
            loss = loss + self.image_loss_weight * image_mse
            parts["image_mse"] = image_mse.detach()
        if not self.vae_frozen and self.recon_weight > 0:
            recon = self.vae.decode(thin_latent, size=tuple(thin.shape[2:]))
            recon_l1 = F.l1_loss(recon.float(), thin.float())
            loss = loss + self.recon_weight * recon_l1
            parts["recon_l1"] = recon_l1.detach()
        parts["loss"] = loss.detach()
        return loss, parts

    def loss_from_latents(self, condition_latent: torch.Tensor, thin_latent: torch.Tensor,
                          generator: torch.Generator | None = None, *, source_latent: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Diffusion loss on (scaled) latents, e.g. cached ones in the frozen phase.

        `source_latent` is the flow's source (diffusion.source 'interpolation'); None draws Gaussian noise.
        """
        loss, parts, _ = self._latent_loss(condition_latent, thin_latent, generator, source_latent)
        return loss, parts

    def _latent_loss(self, condition_latent: torch.Tensor, thin_latent: torch.Tensor,
                     generator: torch.Generator | None, source_latent: torch.Tensor | None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(diffusion loss, its parts, the x0 estimate of the prediction when image_loss_weight needs it)."""
        check_clip("thin_latent", thin_latent, channels=self.vae.latent_channels, min_frames=1)
        check_clip("condition_latent", condition_latent, channels=self.vae.latent_channels, min_frames=1)
        x0 = thin_latent.float()
        if source_latent is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        else:
            noise = source_latent.float()
        timesteps = self.diffusion.sample_timesteps(x0.shape[0], x0.device, generator)
        noisy = self.diffusion.add_noise(x0, noise, timesteps)
        prediction = self.denoiser(noisy, condition_latent, timesteps)
        loss = self.diffusion.loss(prediction, x0, noise, timesteps)
        x0_estimate = self.diffusion.predicted_x0(noisy, prediction, timesteps) if self.image_loss_weight > 0 else None
        return loss, {"diffusion": loss.detach()}, x0_estimate

    def decode_output(self, latent: torch.Tensor, size: tuple[int, int, int], interp: torch.Tensor | None,
                      interp_latent: torch.Tensor | None, vae_grad: bool = False) -> torch.Tensor:
        """The thin clip a latent stands for, in float32 and unclamped: decode(latent), or with residual decoding
        interp + decode(latent) - decode(latent of interp). Gradients reach the latent; the VAE's own parameters
        and its decode of the interpolation get them only with `vae_grad` (full phase)."""
        decoded = self.vae.decode(latent, size=size).float()
        if not self.residual_decoding:
            return decoded
        with torch.set_grad_enabled(vae_grad):
            anchor = self.vae.decode(interp_latent, size=size).float()
        return interp.float() + (decoded - anchor)  # the difference first: an equal latent returns interp exactly

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def sample(self, thick: torch.Tensor, steps: int | None = None, generator: torch.Generator | None = None,
               interp: torch.Tensor | None = None) -> torch.Tensor:
        """The thin clip (B, 1, T * thick_factor, H, W) in [0, 1] for a thick clip, by `steps` sampling steps.

        `interp` is the thick clip's interpolation on the thin grid, needed when the model uses it.
        """
        check_clip("thick", thick)
        b, _, n, h, w = thick.shape
        size = (n * self.thick_factor, h, w)
        if interp is not None and tuple(interp.shape) != (b, 1, *size):
            raise ValueError(f"interpolated clip {tuple(interp.shape)} does not match thick clip {tuple(thick.shape)}: "
                             f"expected {(b, 1, *size)}")
        condition, source, interp_latent = self.input_latents(thick, interp)
        latent = self.diffusion.sample(
            lambda x, t: self.denoiser(x, condition, t),
            self.vae.latent_shape((b, 1, *size)),
            steps if steps is not None else self.sample_steps,
            thick.device,
            generator,
            source,
        )
        return self.decode_output(latent, size, interp, interp_latent).clamp(0.0, 1.0)


def build_model(config: RunConfig, vae: ClipVAE) -> VideoToVideoDiffusion:
    """The configured model around `vae` (its kind must match the variant), with the VAE frozen."""
    expected = VAE_KIND_OF_VARIANT[config.variant]
    if vae.kind != expected:
        raise ValueError(f"variant {config.variant!r} needs a {expected!r} VAE, got a {vae.kind!r} one")
    return VideoToVideoDiffusion(
        vae,
        Denoiser.from_config(config.denoiser, vae.latent_channels, config.data.thick.factor, vae.factors[0]),
        Diffusion(config.diffusion),
        thick_factor=config.data.thick.factor,
        recon_weight=config.training.full.recon_weight,
        sample_steps=config.diffusion.sample_steps,
        condition=config.v2v.condition,
        residual_decoding=config.v2v.residual_decoding,
        interpolation=Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation),
        image_loss_weight=config.training.image_loss_weight,
    )
