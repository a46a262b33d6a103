"""The denoiser on [noisy thin latent, condition latent at the thin depth, slab phase].

The condition is the thick clip's latent (resampled along depth) or the latent of the interpolated clip
(already at the thin depth). Two networks (denoiser.architecture):
- `unet`: MONAI's 3D DiffusionModelUNet. MONAI zero-initialises its output convolution, so an untrained
  denoiser outputs zero: a flow from the interpolation's latent then stays there.
- `reformat`: ReformatCNN, 2D convolutions over reformat planes, (slice, row) and (slice, column), one shared
  network whose two outputs are averaged. A calibration on the project's protocol (shared/FIELD_NOTES.md) found
  the through-plane residual learnable from one patient in reformat planes (+0.37 dB, +0.67 with augmentation)
  and not with 3D convolutions on 3D crops (0.00). Its last layer starts near zero (LAST_LAYER_INIT_STD), so an
  untrained model returns nearly, not exactly, its start.

Slab phase (denoiser.slab_phase): clips start on a thick slice (ctv2v.data.clips), so thin frame t sits at
phase t mod k inside its slab; the denoiser gets k one-hot channels of it, averaged over the thin frames of each
latent frame when the VAE downsamples depth. A convolution cannot otherwise tell a measured frame from one
halfway between two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from ctv2v.config import DenoiserConfig
from ctv2v.models.shapes import crop_to, pad_to_multiple


def resample_depth(thick_latent: torch.Tensor, depth: int) -> torch.Tensor:
    """Linear interpolation of a (B, C, d, h, w) latent along depth only, to (B, C, depth, h, w)."""
    _, _, _, height, width = thick_latent.shape
    return F.interpolate(thick_latent, size=(depth, height, width), mode="trilinear", align_corners=False)


def slab_phase_channels(frames: int, thick_factor: int, depth_factor: int) -> torch.Tensor:
    """(thick_factor, frames) one-hot slab phase of `frames` latent frames of a clip that starts on a thick slice,
    each latent frame averaging its `depth_factor` thin frames."""
    thin = torch.arange(frames * depth_factor) % thick_factor
    one_hot = F.one_hot(thin, thick_factor).float().T
    return one_hot.view(thick_factor, frames, depth_factor).mean(dim=2)


LAST_LAYER_INIT_STD = 1e-2
"""Near zero, so an untrained model returns (almost) its start; not zero, which did not learn in 300 steps. At
1e-3 the reformat CNN sat at +0.00 dB for 300 steps on the demo's training patient (no augmentation), at 1e-2 it
left that plateau after ~100 (+0.22 / +0.33 dB at 200 steps; image-space check, example_ct / example_ct_sm)."""


class ReformatCNN(nn.Module):
    """A residual CNN over reformat planes: (B, C, D, H, W) -> (B, out, D, H, W).

    In evaluation, each (slice, column) plane (one per row) and each (slice, row) plane (one per column) goes
    through the same 2D network and the two results are averaged (+0.1-0.2 dB over one orientation in the
    calibration). In training only the (slice, column) planes are used, at half the cost: the training clips'
    random transpose (data.augment.flips) shows the network both orientations. Convolutions pad by replicating the edge (zero padding at the
    volume's ends made a reformat CNN learn a component data consistency does not remove). The timestep enters
    as a learned bias on the first hidden layer.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 48, layers: int = 6):
        super().__init__()
        sizes = [in_channels] + [width] * (layers - 1) + [out_channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, padding_mode="replicate")
                                   for a, b in zip(sizes[:-1], sizes[1:]))
        self.time_embedding = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.width = width
        nn.init.normal_(self.convs[-1].weight, std=LAST_LAYER_INIT_STD)
        nn.init.zeros_(self.convs[-1].bias)

    def _planes(self, planes: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
        x = planes
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index == 0:
                x = x + time_bias[:, :, None, None]
            if index < len(self.convs) - 1:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        time = self.time_embedding(get_timestep_embedding(timesteps, self.width).to(x.dtype))
        # (slice, column) planes: rows join the batch.
        rows = x.permute(0, 3, 1, 2, 4).reshape(b * h, c, d, w)
        out_rows = self._planes(rows, time.repeat_interleave(h, dim=0))
        out_rows = out_rows.view(b, h, -1, d, w).permute(0, 2, 3, 1, 4)
        if self.training:
            return out_rows
        # (slice, row) planes: columns join the batch.
        cols = x.permute(0, 4, 1, 2, 3).reshape(b * w, c, d, h)
        out_cols = self._planes(cols, time.repeat_interleave(w, dim=0))
        out_cols = out_cols.view(b, w, -1, d, h).permute(0, 2, 3, 4, 1)
        return 0.5 * (out_rows + out_cols)


class Denoiser(nn.Module):
    """Predicts noise / velocity for the thin latent, conditioned on the thick latent by channel concatenation
    (and on the slab phase when `thick_factor` is given).

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
        architecture: str = "unet",
        reformat_width: int = 48,
        reformat_layers: int = 6,
        thick_factor: int | None = None,
        depth_factor: int = 1,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.architecture = architecture
        self.thick_factor = thick_factor
        self.depth_factor = depth_factor
        in_channels = 2 * latent_channels + (thick_factor or 0)
        if architecture == "reformat":
            self.reformat = ReformatCNN(in_channels, latent_channels, reformat_width, reformat_layers)
            self.size_multiple = 1
            return
        if architecture != "unet":
            raise ValueError(f"denoiser.architecture must be 'unet' or 'reformat', got {architecture!r}")
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=in_channels,
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
    def from_config(cls, config: DenoiserConfig, latent_channels: int, thick_factor: int,
                    depth_factor: int) -> "Denoiser":
        """A Denoiser with the architecture in `config` for latents with `latent_channels` channels, whose frames
        each stand for `depth_factor` thin slices of clips at thick factor `thick_factor`."""
        return cls(
            latent_channels,
            config.channels,
            config.attention_levels,
            config.num_res_blocks,
            config.num_head_channels,
            config.norm_num_groups,
            config.gradient_checkpointing,
            config.architecture,
            config.reformat_width,
            config.reformat_layers,
            thick_factor if config.slab_phase else None,
            depth_factor,
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
        inputs = [noisy, condition.to(noisy.dtype)]
        if self.thick_factor is not None:
            phase = slab_phase_channels(size[0], self.thick_factor, self.depth_factor).to(noisy)
            inputs.append(phase[None, :, :, None, None].expand(noisy.shape[0], -1, -1, *size[1:]))
        x = pad_to_multiple(torch.cat(inputs, dim=1), (self.size_multiple,) * 3)
        network = self.reformat if self.architecture == "reformat" else self.unet
        return crop_to(network(x, timesteps), size)
