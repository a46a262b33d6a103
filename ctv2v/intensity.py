"""The one place that maps HU to the VAE's input range and back.

MAISI's CT contract: HU clipped to [-1000, 1000] and scaled to [0, 1]. Feeding [-1, 1] instead gave an
earlier prototype 7-13 dB reconstructions, so no other module rescales intensities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ctv2v.config import IntensityConfig

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Intensity:
    """HU <-> [0, 1] for the window [hu_min, hu_max]; values outside the window are clipped."""

    hu_min: float = -1000.0
    hu_max: float = 1000.0

    @classmethod
    def from_config(cls, config: IntensityConfig) -> "Intensity":
        return cls(config.hu_min, config.hu_max)

    @property
    def width(self) -> float:
        return self.hu_max - self.hu_min

    def to_unit(self, hu: ArrayLike) -> ArrayLike:
        """HU -> [0, 1], clipping to the window first."""
        if isinstance(hu, torch.Tensor):
            return (hu.clamp(self.hu_min, self.hu_max) - self.hu_min) / self.width
        return ((np.clip(hu, self.hu_min, self.hu_max) - self.hu_min) / self.width).astype(np.float32)

    def to_hu(self, unit: ArrayLike) -> ArrayLike:
        """[0, 1] -> HU, the exact inverse of `to_unit` inside the window."""
        if isinstance(unit, torch.Tensor):
            return unit * self.width + self.hu_min
        return (np.asarray(unit, dtype=np.float32) * self.width + self.hu_min).astype(np.float32)
