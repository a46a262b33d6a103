"""The denoiser: MONAI's 3D DiffusionModelUNet on [noisy thin latent, condition latent at the thin depth].

The condition is the thick clip's latent (resampled along depth) or the latent of the interpolated clip
(already at the thin depth). MONAI zero-initialises the UNet's output convolution, so an untrained denoiser
outputs zero: a flow from the interpolation's latent then stays there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from ctv2v.config import DenoiserConfig
from ctv2v.models.vae import crop_to, pad_to_multiple


def resample_depth(thick_latent: torch.Tensor, depth: int) -> torch.Tensor:
    """Linear interpolation of a (B, C, d, h, w) latent along depth only, to (B, C, depth, h, w)."""
    _, _, _, height, width = thick_latent.shape
    return F.interpolate(thick_latent, size=(depth, height, width), mode="trilinear", align_corners=False)


class Denoiser(nn.Module):
    """Predicts noise / velocity for the thin latent, conditioned on the thick latent by channel concatenation.

    Latent sizes the UNet's 2**(levels-1) downsampling does not divide are padded and cropped back.
    """

    def __init__(
        self,
        latent_channels: int,
        channels: list[int] | tuple[int, ...] = (64, 128, 256),
        attention_levels: list[bool] | tuple[bool, ...] = (False, False, True),
        num_res_blocks: int = 2,
        num_head_channels: int = 32,
        norm_num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=2 * latent_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=list(channels),
            attention_levels=list(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )
        self.size_multiple = 2 ** (len(channels) - 1)
        if gradient_checkpointing:
            # DiffusionModelUNet has no checkpointing switch. The wrapper recomputes each block's activations in
            # backward and its state-dict hooks keep the parameter names unchanged, so checkpoints stay portable.
            blocks = {*self.unet.down_blocks, self.unet.middle_block, *self.unet.up_blocks}
            apply_activation_checkpointing(self.unet, check_fn=lambda module: module in blocks)

    @classmethod
    def from_config(cls, config: DenoiserConfig, latent_channels: int) -> "Denoiser":
        """A Denoiser with the architecture in `config` for latents with `latent_channels` channels."""
        return cls(
            latent_channels,
            config.channels,
            config.attention_levels,
            config.num_res_blocks,
            config.num_head_channels,
            config.norm_num_groups,
            config.gradient_checkpointing,
        )

    def forward(self, noisy: torch.Tensor, condition: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Model output for `noisy` (B, C, D, h, w) at `timesteps` (B,), given a condition latent (B, C, d, h, w)."""
        if noisy.shape[:2] != condition.shape[:2] or noisy.shape[3:] != condition.shape[3:]:
            raise ValueError(
                f"noisy latent {tuple(noisy.shape)} and condition latent {tuple(condition.shape)} must agree in "
                "batch, channels, height and width"
            )
        size = tuple(noisy.shape[2:])
        if condition.shape[2] != size[0]:
            condition = resample_depth(condition, size[0])
        condition = condition.to(noisy.dtype)
        x = pad_to_multiple(torch.cat([noisy, condition], dim=1), (self.size_multiple,) * 3)
        return crop_to(self.unet(x, timesteps), size)
