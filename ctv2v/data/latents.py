"""The frozen phase's latent cache: training volumes encoded once, and aligned latent crops of them.

With the VAE frozen, encoding is a fixed function, so each training volume (thin and thick) is encoded once,
in tiles whose origins and sizes are multiples of the VAE's downsampling factors, and clips are cropped from
the latents at origins that are multiples of the factors (and of the thick factor in depth). A latent crop
then covers exactly the voxels of its image crop. Two documented differences from encoding every clip on its
own: the encoder sees the volume around the crop (context the per-clip path pads instead), and clips are not
flipped, because the encoder is not flip-equivariant: a flipped latent is not the latent of the flipped clip,
so the denoiser would learn from latents no image has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch.utils.data import Dataset

from ctv2v.config import ClipConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.intensity import Intensity

if TYPE_CHECKING:  # data comes before models in the layering: the VAE is only a type here
    from ctv2v.models.vae import ClipVAE

log = logging.getLogger(__name__)


class LatentCacheError(ValueError):
    """The latent cache cannot be built or cropped as configured; the message says which setting."""


# ----------------------------------------------------------------------------------- latent cache
@dataclass
class VolumeLatents:
    """A training volume's thin and thick latents (C, D', H', W') and the image extents they cover."""

    volume_id: str
    thin: torch.Tensor
    thick: torch.Tensor
    thin_shape: tuple[int, int, int]
    """The thin volume's (slices, rows, cols) before padding."""
    thick_slices: int


CACHE_TILE_OVERLAP = 0.125
"""Overlap of neighbouring cache tiles: enough context at tile borders for a few convolution layers, at
(8/7)^3 = 1.5x the encoding work of abutting tiles (an overlap of 0.5 would cost 8x)."""


def aligned_tile(volume_size: tuple[int, ...], wanted: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...]:
    """Tile sizes that are multiples of 8 x factor, so that tiles overlapping by 1/8 start on factor multiples;
    the whole axis where the volume is not larger than that."""
    tile = []
    for size, want, factor in zip(volume_size, wanted, factors):
        step = 8 * factor
        aligned = max(step, want // step * step)
        tile.append(size if aligned >= size else aligned)
    return tuple(tile)


def _pad_to(x: torch.Tensor, minimum: tuple[int, int, int], factors: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (D, H, W) at the high end to at least `minimum` and to multiples of `factors`.

    Zero is hu_min after scaling: the fill ctv2v.data.clips uses beyond a volume's edge.
    """
    target = [math.ceil(max(s, m) / f) * f for s, m, f in zip(x.shape, minimum, factors)]
    return F.pad(x, [0, target[2] - x.shape[2], 0, target[1] - x.shape[1], 0, target[0] - x.shape[0]])


@torch.no_grad()
def encode_volume(vae: "ClipVAE", volume: torch.Tensor, tile: tuple[int, int, int]) -> torch.Tensor:
    """(D, H, W) [0, 1] volume, sizes multiples of the factors -> (C, D/fd, H/fs, W/fs) latent.

    Encoded in overlapping tiles whose sizes and origins are multiples of the factors, blended with Gaussian
    weights (MONAI sliding-window inference), so that memory stays bounded for whole CT volumes.
    """
    bad = [s for s, f in zip(volume.shape, vae.factors) if s % f]
    if bad:
        raise LatentCacheError(f"encode_volume: volume shape {tuple(volume.shape)} is not a multiple of {vae.factors}")
    roi = aligned_tile(tuple(volume.shape), tile, vae.factors)
    latent = sliding_window_inference(volume[None, None], roi_size=roi, sw_batch_size=1, predictor=vae.encode,
                                      overlap=CACHE_TILE_OVERLAP, mode="gaussian")
    return latent[0]


def encode_training_volumes(
    vae: "ClipVAE", volumes: list[Preprocessed], clip: ClipConfig, intensity: Intensity, device: torch.device
) -> list[VolumeLatents]:
    """Encode every training volume's thin and thick series once (the frozen phase's latent cache).

    Under DDP every rank encodes every volume: one pass over the training set, small next to an epoch, and no
    rank has to wait for or receive another's latents.
    """
    vae.eval()
    tile = (4 * clip.frames, 4 * clip.height, 4 * clip.width)
    cached = []
    for volume in volumes:
        k = volume.thick.factor
        thin = _pad_to(torch.from_numpy(intensity.to_unit(volume.thin)),
                       (clip.frames, clip.height, clip.width), vae.factors)
        thick = _pad_to(torch.from_numpy(intensity.to_unit(volume.thick.array)),
                        (clip.frames // k, clip.height, clip.width), vae.factors)
        cached.append(VolumeLatents(
            volume.volume_id,
            encode_volume(vae, thin.to(device), tile).cpu(),
            encode_volume(vae, thick.to(device), (tile[0] // k, tile[1], tile[2])).cpu(),
            tuple(volume.thin.shape),
            volume.thick.array.shape[0],
        ))
        log.info("latent cache: %s thin %s -> latent %s", volume.volume_id, tuple(volume.thin.shape),
                 tuple(cached[-1].thin.shape))
    return cached


class LatentClips(Dataset):
    """Aligned latent crops of cached volumes: `clips_per_volume` per volume and epoch, like TrainClips.

    Item i of epoch e comes from volume i // clips_per_volume at an origin drawn from a generator seeded by
    (seed, e, i); in image voxels the origin is a multiple of (thick factor x depth factor, spatial factor,
    spatial factor) and obeys TrainClips' bounds (the clip's thick slices exist; its thin slices too where
    the volume is long enough). No flips (see the module docstring).
    """

    def __init__(self, latents: list[VolumeLatents], clip: ClipConfig, factors: tuple[int, int, int],
                 thick_factor: int, seed: int):
        if not latents:
            raise LatentCacheError("the latent cache holds no training volume")
        depth_factor, spatial_factor, _ = factors
        self.step = (thick_factor * depth_factor, spatial_factor, spatial_factor)
        self.size = (clip.frames, clip.height, clip.width)
        bad = [f"{name}={s} (needs a multiple of {m})"
               for name, s, m in zip(("frames", "height", "width"), self.size, self.step) if s % m]
        if bad:
            raise LatentCacheError(f"data.clip: the latent cache needs clips aligned to the VAE's factors {factors} "
                                f"and the thick factor {thick_factor}: {', '.join(bad)}; change the clip size or "
                                "set training.latent_cache=false")
        self.latents, self.clips_per_volume, self.seed = latents, clip.clips_per_volume, seed
        self.factors, self.thick_factor = factors, thick_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops the dataset returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.latents) * self.clips_per_volume

    def origin(self, index: int) -> tuple[int, int, int]:
        """Item `index`'s crop origin in thin image voxels."""
        item = self.latents[index // self.clips_per_volume]
        (slices, rows, cols), k = item.thin_shape, self.thick_factor
        frames, height, width = self.size
        last = (max(min((item.thick_slices - frames // k) * k, slices - frames), 0), max(rows - height, 0),
                max(cols - width, 0))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        z, y, x = (int(rng.integers(0, end // step + 1)) * step for end, step in zip(last, self.step))
        return z, y, x

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.latents[index // self.clips_per_volume]
        z, y, x = self.origin(index)
        (fd, fs, _), (t, h, w) = self.factors, self.size
        rows, cols = slice(y // fs, (y + h) // fs), slice(x // fs, (x + w) // fs)
        zk, tk = z // self.thick_factor, t // self.thick_factor
        return {"thin_latent": item.thin[:, z // fd:(z + t) // fd, rows, cols],
                "thick_latent": item.thick[:, zk // fd:(zk + tk) // fd, rows, cols],
                "volume_id": item.volume_id, "origin": torch.tensor([z, y, x])}
