"""Thick-slice series from a thin one, when a dataset has no real paired thick series.

Thick slice j is centred on thin slice j*k (k = `factor`), so the thin slices between thick centres are the
ones a model or a baseline has to synthesize. `slab_average` integrates the thin series over a slab of
`thickness_mm` around each centre, weighting every thin slice by how much of its extent lies in the slab
(partial-volume box filter; slabs are truncated at the volume's ends). `subsample` keeps every k-th slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctv2v.config import ThickConfig


@dataclass(frozen=True)
class ThickSeries:
    array: np.ndarray
    """(n_thick, rows, cols) float32 HU."""
    factor: int
    """Thin slices per thick slice; thick slice j sits on thin slice j * factor."""
    spacing_mm: float
    thickness_mm: float
    method: str

    @property
    def thin_indices(self) -> np.ndarray:
        """The thin-slice index under each thick slice."""
        return np.arange(self.array.shape[0]) * self.factor

    def describe(self) -> str:
        """How the thick series was made, for every report next to every number."""
        if self.method == "subsample":
            return f"one thin slice in {self.factor} kept (spacing {self.spacing_mm:g} mm)"
        if self.method == "paired":
            return f"real paired thick series every {self.spacing_mm:g} mm (x{self.factor} of the thin spacing)"
        return (
            f"slab average over {self.thickness_mm:g} mm every {self.spacing_mm:g} mm "
            f"(x{self.factor} of the thin spacing)"
        )


def slab_weights(n_thin: int, centre: int, thickness_slices: float) -> np.ndarray:
    """Overlap of each thin slice [i-1/2, i+1/2] with the slab [centre - t/2, centre + t/2], in slice units."""
    idx = np.arange(n_thin, dtype=np.float64)
    lo = np.maximum(idx - 0.5, centre - thickness_slices / 2)
    hi = np.minimum(idx + 0.5, centre + thickness_slices / 2)
    return np.clip(hi - lo, 0.0, None)


def simulate_thick(thin: np.ndarray, thin_spacing_mm: float, config: ThickConfig) -> ThickSeries:
    """The thick series of a thin (slice, row, col) HU volume."""
    if thin.ndim != 3:
        raise ValueError(f"thin volume must be (slice, row, col), got shape {thin.shape}")
    k = config.factor
    if thin.shape[0] < k + 1:
        raise ValueError(f"thin volume has {thin.shape[0]} slices; x{k} needs at least {k + 1}")
    centres = np.arange(0, thin.shape[0], k)
    spacing = k * thin_spacing_mm
    if config.method == "subsample":
        return ThickSeries(thin[centres].astype(np.float32), k, spacing, thin_spacing_mm, "subsample")
    thickness_mm = config.thickness_mm if config.thickness_mm is not None else spacing
    thickness_slices = thickness_mm / thin_spacing_mm
    thick = np.empty((len(centres),) + thin.shape[1:], dtype=np.float32)
    for j, centre in enumerate(centres):
        weights = slab_weights(thin.shape[0], int(centre), thickness_slices)
        used = np.nonzero(weights)[0]
        w = weights[used] / weights[used].sum()
        thick[j] = np.tensordot(w, thin[used].astype(np.float64), axes=1)
    return ThickSeries(thick, k, spacing, thickness_mm, "slab_average")
