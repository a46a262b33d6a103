"""Padding a clip's last three axes up to a network's downsampling multiples, and cropping it back."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiples: tuple[int, int, int]) -> torch.Tensor:
    """Pad the last three axes of a 5D tensor at their end up to the given multiples (reflect, else replicate)."""
    for axis, multiple in zip((2, 3, 4), multiples):
        size = x.shape[axis]
        pad = -size % multiple
        if pad == 0:
            continue
        spec = [0] * 6
        spec[2 * (4 - axis) + 1] = pad  # F.pad lists the last axis first, (before, after) per axis
        x = F.pad(x, spec, mode="reflect" if pad < size else "replicate")
    return x


def crop_to(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """The leading `size` voxels of the last three axes (undoes `pad_to_multiple`)."""
    depth, height, width = size
    return x[..., :depth, :height, :width]
