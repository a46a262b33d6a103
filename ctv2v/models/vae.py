"""Clip VAEs: one interface for the scratch "2D + time" VAE (`main`) and NVIDIA MAISI's CT VAE (`pretrained`).

Clips are (B, 1, T, H, W) in the normalized intensity range [0, 1] (ctv2v.intensity); slices are frames.
`encode` returns the deterministic posterior mean times `latent_scale` (1/std of training latents, as in
latent diffusion and MAISI), `decode` divides it back out. Sizes the network's downsampling does not divide
are padded (reflect, or replicate where an axis is too short to reflect) and cropped back after decoding:
AutoencoderKlMaisi would otherwise silently truncate them (5 slices -> 4).
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from monai.networks.blocks import Convolution, Upsample
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ctv2v.config import MaisiVAEConfig, RunConfig, ScratchVAEConfig
from ctv2v.files import atomic_torch_save, atomic_write_text, load_torch_file, sha256_file
from ctv2v.models.maisi import MAISI_CT_ARCH, build_autoencoder
from ctv2v.models.shapes import crop_to, pad_to_multiple
from ctv2v.models.weights import VAE_KINDS, WEIGHTS_KINDS, load_state_strictly

logger = logging.getLogger(__name__)

MIN_FRAMES = 2
"""A clip is a sequence of slices; one slice has no neighbours to interpolate between."""


def check_clip(name: str, tensor: torch.Tensor, channels: int = 1, min_frames: int = MIN_FRAMES) -> None:
    """Raise ValueError naming `name` and its shape unless `tensor` is a finite (B, channels, T, H, W) tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    if tensor.ndim != 5:
        raise ValueError(f"{name}: expected shape (B, {channels}, T, H, W), got {shape} ({tensor.ndim} dims)")
    if shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channel(s) in (B, C, T, H, W), got shape {shape}")
    if shape[2] < min_frames:
        raise ValueError(f"{name}: has {shape[2]} slice(s) in shape {shape}; at least {min_frames} are needed")
    # Fake tensors (memory/FLOP estimation) carry shapes but no values.
    if not isinstance(tensor, FakeTensor) and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: {bad} NaN/Inf value(s) in tensor of shape {shape}")


class ClipVAE(nn.Module, ABC):
    """A KL-regularized clip autoencoder: (B, 1, T, H, W) in [0, 1] <-> (B, C, T/depth_factor, H/s, W/s)."""

    kind: str
    """One of VAE_KINDS (ctv2v.models.weights)."""
    autoencoder: nn.Module
    """The network whose state dict is the artifact's `vae.pt` (for MAISI: exactly AutoencoderKlMaisi's)."""

    def __init__(self, latent_channels: int, depth_factor: int, spatial_factor: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.depth_factor = depth_factor
        self.spatial_factor = spatial_factor
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.weights_label: str | None = None
        """Set by `load_vae_artifact`: which weights these are (a weights label, ctv2v.models.weights)."""

    # -- what subclasses provide
    @abstractmethod
    def architecture(self) -> dict[str, Any]:
        """Constructor arguments that rebuild `autoencoder` (saved in `vae.json`)."""

    @abstractmethod
    def part_parameters(self) -> dict[str, int]:
        """Parameter counts of the encoder side and the decoder side."""

    @abstractmethod
    def _posterior(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of a clip whose sizes the factors divide."""

    @abstractmethod
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> clip of the latent's size times the factors."""

    # -- the interface
    @property
    def factors(self) -> tuple[int, int, int]:
        return (self.depth_factor, self.spatial_factor, self.spatial_factor)

    def latent_shape(self, clip_shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int, int, int]:
        """The latent shape of a (B, 1, T, H, W) clip (sizes the factors do not divide are padded up)."""
        batch, _, *spatial = clip_shape
        return (batch, self.latent_channels, *(math.ceil(s / f) for s, f in zip(spatial, self.factors)))

    def encode_posterior(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mu, logvar) of a [0, 1] clip, for VAE training."""
        check_clip("clip", clip)
        return self._posterior(pad_to_multiple(clip, self.factors))

    def encode(self, clip: torch.Tensor) -> torch.Tensor:
        """Deterministic latent: the posterior mean times `latent_scale`."""
        mu, _ = self.encode_posterior(clip)
        return mu * self.latent_scale.to(mu.dtype)

    def decode(self, latent: torch.Tensor, size: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Scaled latent -> clip, cropped to `size` (T, H, W) (default: the latent's size times the factors)."""
        check_clip("latent", latent, channels=self.latent_channels, min_frames=1)
        return self._decode_to_size(latent / self.latent_scale.to(latent.dtype), size)

    def _decode_to_size(self, z: torch.Tensor, size: tuple[int, int, int] | None) -> torch.Tensor:
        decoded = self._decode(z)
        if size is None:
            return decoded
        size = tuple(int(s) for s in size)
        if any(want > have for want, have in zip(size, decoded.shape[2:])):
            raise ValueError(
                f"latent of shape {tuple(z.shape)} decodes to {tuple(decoded.shape[2:])}, smaller than the "
                f"requested clip size {size}"
            )
        return crop_to(decoded, size)


# ------------------------------------------------------------------------------------------ scratch VAE
INITIAL_LOGVAR = -8.0
"""The scratch VAE's initial posterior log-variance (see ScratchAutoencoder)."""
NORM_EPS = 1e-6
"""GroupNorm's epsilon in the scratch VAE (as in MAISI's)."""


class ScratchAutoencoder(nn.Module):
    """Residual KL autoencoder whose 3D convolutions downsample in-plane only (stride (1, 2, 2)).

    MONAI's AutoencoderKL downsamples isotropically, so the encoder and decoder are assembled here from MONAI
    blocks (Convolution; AEKLResBlock, a GroupNorm + SiLU residual block; nearest Upsample + convolution).
    The encoder ends in 2 * latent_channels maps: the posterior mean and log-variance.
    """

    def __init__(self, channels: list[int] | tuple[int, ...], latent_channels: int, num_res_blocks: int,
                 norm_num_groups: int, norm_eps: float):
        super().__init__()

        def conv(cin: int, cout: int, strides: int | tuple[int, int, int] = 1) -> Convolution:
            return Convolution(3, cin, cout, strides=strides, kernel_size=3, padding=1, conv_only=True)

        def res(cin: int, cout: int) -> AEKLResBlock:
            return AEKLResBlock(3, cin, norm_num_groups, norm_eps, cout)

        def norm_act(ch: int) -> list[nn.Module]:
            return [nn.GroupNorm(norm_num_groups, ch, eps=norm_eps), nn.SiLU()]

        last = len(channels) - 1
        enc: list[nn.Module] = [conv(1, channels[0])]
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                enc.append(res(prev, ch))
                prev = ch
            if level < last:
                enc.append(conv(ch, ch, strides=(1, 2, 2)))
        enc += [res(prev, prev), *norm_act(prev), conv(prev, 2 * latent_channels)]
        self.encoder = nn.Sequential(*enc)
        # The log-variance half starts at exp(-8) (posterior std 0.018): the decoder learns from (almost) the
        # posterior mean that every later use decodes, instead of from unit-variance noise around it.
        with torch.no_grad():
            self.encoder[-1].conv.bias[latent_channels:].fill_(INITIAL_LOGVAR)

        rev = list(reversed(channels))
        dec: list[nn.Module] = [conv(latent_channels, rev[0]), res(rev[0], rev[0])]
        prev = rev[0]
        for level, ch in enumerate(rev):
            for _ in range(num_res_blocks):
                dec.append(res(prev, ch))
                prev = ch
            if level < last:
                dec.append(
                    Upsample(3, in_channels=ch, out_channels=ch, scale_factor=(1, 2, 2), mode="nontrainable",
                             interp_mode="nearest", align_corners=None, post_conv=conv(ch, ch))
                )
        dec += [*norm_act(prev), conv(prev, 1)]
        self.decoder = nn.Sequential(*dec)


class ScratchVAE(ClipVAE):
    """The `main` variant: MAISI-inspired, grayscale, "2D + time" (depth factor 1: every slice stays a latent slice)."""

    kind = "scratch"

    def __init__(self, channels: list[int] | tuple[int, ...], latent_channels: int, num_res_blocks: int,
                 norm_num_groups: int, norm_eps: float = NORM_EPS):
        """The architecture's defaults are ScratchVAEConfig's; `norm_eps` is GroupNorm's epsilon (not configured)."""
        super().__init__(latent_channels, depth_factor=1, spatial_factor=2 ** (len(channels) - 1))
        self._arch = {
            "channels": list(channels),
            "latent_channels": latent_channels,
            "num_res_blocks": num_res_blocks,
            "norm_num_groups": norm_num_groups,
            "norm_eps": norm_eps,
        }
        self.autoencoder = ScratchAutoencoder(**self._arch)

    @classmethod
    def from_config(cls, config: ScratchVAEConfig) -> "ScratchVAE":
        """A ScratchVAE with the architecture in `config` (random weights)."""
        return cls(config.channels, config.latent_channels, config.num_res_blocks, config.norm_num_groups)

    def architecture(self) -> dict[str, Any]:
        return dict(self._arch)

    def part_parameters(self) -> dict[str, int]:
        return {"encoder": _count(self.autoencoder.encoder), "decoder": _count(self.autoencoder.decoder)}

    def _posterior(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.autoencoder.encoder(clip).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decoder(z)


# -------------------------------------------------------------------------------------------- MAISI VAE
class MaisiVAE(ClipVAE):
    """The `pretrained` variant: MONAI's AutoencoderKlMaisi, encoding clips in one of three modes.

    `volume`: the whole clip is one 3D volume. `stack`: groups of `stack_size` slices are encoded and decoded
    independently (the seed's temporal stacking; context is cut at every group boundary). `tiled`: overlapping
    tiles in depth and in-plane, blended with Gaussian weights (MONAI sliding-window inference), for clips too
    large to encode at once.
    """

    kind = "maisi"

    def __init__(self, arch: dict[str, Any] | None = None, runtime: MaisiVAEConfig | None = None):
        arch = dict(MAISI_CT_ARCH if arch is None else arch)
        factor = 2 ** (len(arch["num_channels"]) - 1)
        super().__init__(arch["latent_channels"], depth_factor=factor, spatial_factor=factor)
        self.runtime = runtime if runtime is not None else MaisiVAEConfig()
        if self.runtime.stack_size % factor:
            raise ValueError(f"vae.maisi.stack_size={self.runtime.stack_size} is not a multiple of {factor}")
        self._arch = arch
        self.autoencoder = build_autoencoder(
            arch,
            num_splits=self.runtime.num_splits,
            dim_split=self.runtime.dim_split,
            norm_float16=self.runtime.norm_float16,
            use_checkpointing=self.runtime.use_checkpointing,
        )

    @property
    def encode_mode(self) -> str:
        return self.runtime.encode_mode

    def architecture(self) -> dict[str, Any]:
        return dict(self._arch)

    def part_parameters(self) -> dict[str, int]:
        ae = self.autoencoder
        return {
            "encoder": _count(ae.encoder) + _count(ae.quant_conv_mu) + _count(ae.quant_conv_log_sigma),
            "decoder": _count(ae.post_quant_conv) + _count(ae.decoder),
        }

    def _check_device(self, x: torch.Tensor) -> None:
        if self.runtime.norm_float16 and x.device.type != "cuda":
            raise ValueError(
                f"vae.maisi.norm_float16 needs a CUDA device (MAISI's fp16 GroupNorm output meets fp32 conv "
                f"biases on {x.device.type}); tensor of shape {tuple(x.shape)} is on {x.device}"
            )

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = self.autoencoder.encode(x)
        return torch.cat([mu, 2 * torch.log(sigma)], dim=1)

    def _posterior(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_device(clip)
        if self.encode_mode == "volume":
            moments = self._moments(clip)
        elif self.encode_mode == "stack":
            moments = torch.cat([self._moments(g) for g in clip.split(self.runtime.stack_size, dim=2)], dim=2)
        else:
            moments = self._tiled(clip, self._moments, self._tile_roi(clip, 1))
        return moments.chunk(2, dim=1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_device(z)
        if self.encode_mode == "volume":
            return self.autoencoder.decode(z)
        if self.encode_mode == "stack":
            group = self.runtime.stack_size // self.depth_factor
            return torch.cat([self.autoencoder.decode(g) for g in z.split(group, dim=2)], dim=2)
        return self._tiled(z, self.autoencoder.decode, self._tile_roi(z, self.spatial_factor))

    def _tile_roi(self, x: torch.Tensor, voxels_per_tile_unit: int) -> tuple[int, int, int]:
        """Tile size in `x`'s voxels, no larger than `x` (so no constant padding enters the blend)."""
        tile = self.runtime.tile
        wanted = (tile.depth, tile.height, tile.width)
        return tuple(min(w // voxels_per_tile_unit, s) for w, s in zip(wanted, x.shape[2:]))

    def _tiled(self, x: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
               roi: tuple[int, int, int]) -> torch.Tensor:
        return sliding_window_inference(
            x, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=self.runtime.tile.overlap,
            mode="gaussian",
        )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_untrained_vae(config: RunConfig) -> ClipVAE:
    """A random-weight VAE of the configured variant (summaries, estimates, tests; real runs load an artifact)."""
    if config.variant == "main":
        return ScratchVAE.from_config(config.vae.scratch)
    return MaisiVAE(MAISI_CT_ARCH, config.vae.maisi)


# ---------------------------------------------------------------------------------------- latent scale
@torch.no_grad()
def compute_latent_scale(vae: ClipVAE, clips: Iterable[torch.Tensor]) -> float:
    """1/std of the unscaled posterior means over `clips`; stores it in `vae.latent_scale` and returns it."""
    was_training = vae.training
    vae.eval()
    total = total_sq = count = 0.0
    for clip in clips:
        mu, _ = vae.encode_posterior(clip.to(vae.latent_scale.device))
        mu = mu.double()
        total += float(mu.sum())
        total_sq += float((mu * mu).sum())
        count += mu.numel()
    vae.train(was_training)
    if count < 2:
        raise ValueError("compute_latent_scale: no clips given (need at least one clip to estimate std(z))")
    variance = total_sq / count - (total / count) ** 2
    std = math.sqrt(max(variance, 0.0))
    if not math.isfinite(std) or std <= 1e-12:
        raise ValueError(f"compute_latent_scale: latent std is {std:g} over {int(count)} values; cannot scale")
    scale = 1.0 / std
    vae.latent_scale.fill_(scale)
    logger.info("latent scale 1/std(z) = %.6g over %d latent values", scale, int(count))
    return scale


# ----------------------------------------------------------------------------------- scratch VAE training
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent value: the mean over latent values and the batch."""
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean()


# -------------------------------------------------------------------------------------------- artifacts
VAE_WEIGHTS_FILE = "vae.pt"
VAE_META_FILE = "vae.json"


def save_vae_artifact(vae: ClipVAE, out_dir: Path, *, weights: str, extra: dict[str, Any]) -> None:
    """Write `vae.pt` (the network's state dict) and `vae.json` (kind, architecture, latent scale, labels)."""
    if weights not in WEIGHTS_KINDS:
        raise ValueError(f"save_vae_artifact: weights must be one of {WEIGHTS_KINDS}, got {weights!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in vae.autoencoder.state_dict().items()}
    atomic_torch_save(state, out_dir / VAE_WEIGHTS_FILE)
    meta = {
        "kind": vae.kind,
        "architecture": vae.architecture(),
        "latent_scale": float(vae.latent_scale),
        "weights": weights,
        "num_tensors": len(state),
        "num_parameters": sum(p.numel() for p in vae.autoencoder.parameters()),
        "vae_pt_sha256": sha256_file(out_dir / VAE_WEIGHTS_FILE),
        "extra": extra,
    }
    atomic_write_text(out_dir / VAE_META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_vae_artifact(directory: Path, maisi_runtime: MaisiVAEConfig | None = None) -> ClipVAE:
    """Rebuild a VAE from `vae.json` and load `vae.pt` strictly (missing or unexpected keys are an error)."""
    directory = Path(directory)
    meta_path, weights_path = directory / VAE_META_FILE, directory / VAE_WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"VAE artifact incomplete: {path} does not exist")
    meta = read_vae_meta(directory)
    digest = sha256_file(weights_path)
    if meta.vae_pt_sha256 != digest:
        raise ValueError(f"{weights_path}: sha256 {digest} does not match {meta_path} ({meta.vae_pt_sha256})")
    if meta.kind == "scratch":
        vae: ClipVAE = ScratchVAE(**meta.architecture)
    elif meta.kind == "maisi":
        vae = MaisiVAE(meta.architecture, maisi_runtime)
    else:
        raise ValueError(f"{meta_path}: unknown VAE kind {meta.kind!r} (expected one of {VAE_KINDS})")
    state = load_torch_file(weights_path, "VAE weights")
    load_state_strictly(vae.autoencoder, state, weights_path)
    vae.latent_scale.fill_(meta.latent_scale)
    vae.weights_label = meta.weights
    logger.info("loaded %s VAE (%s weights, latent scale %.6g) from %s", meta.kind, vae.weights_label,
                meta.latent_scale, directory)
    return vae


@dataclass(frozen=True)
class VAEMeta:
    """What `vae.json` says about a VAE artifact."""

    kind: str
    architecture: dict[str, Any]
    latent_scale: float
    weights: str | None
    vae_pt_sha256: str | None


def read_vae_meta(directory: Path) -> VAEMeta:
    """The `vae.json` of the VAE artifact in `directory`; a missing file or key is one error naming the file."""
    meta_path = Path(directory) / VAE_META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"VAE artifact incomplete: {meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
        return VAEMeta(meta["kind"], meta["architecture"], float(meta["latent_scale"]), meta.get("weights"),
                       meta.get("vae_pt_sha256"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: not a VAE artifact description ({exc!r})") from exc

