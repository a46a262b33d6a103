"""Thick-slice series from a thin one, when a dataset has no real paired thick series.

Thick slice j is centred on thin slice j*k (k = `factor`), so the thin slices between thick centres are the
ones a model or a baseline has to synthesize. `slab_average` integrates the thin series over a slab of
`thickness_mm` around each centre, weighting every thin slice by how much of its extent lies in the slab
(partial-volume box filter; slabs are truncated at the volume's ends). `subsample` keeps every k-th slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctv2v.config import ResampleConfig, ThickConfig


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


def box_resample_weights(n_old: int, old_mm: float, new_mm: float) -> np.ndarray:
    """(n_new, n_old) weights: new voxel i averages the old voxels by their overlap with its extent.

    Both grids start at the same edge; the new grid holds the whole new voxels that fit in the old extent
    (at least one). At equal spacings the matrix is the identity.
    """
    n_new = max(1, int(np.floor(n_old * old_mm / new_mm + 1e-6)))
    lo_new = np.arange(n_new)[:, None] * new_mm
    lo_old = np.arange(n_old)[None, :] * old_mm
    overlap = np.clip(np.minimum(lo_new + new_mm, lo_old + old_mm) - np.maximum(lo_new, lo_old), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resample_spacing(volume: np.ndarray, spacing: tuple[float, float, float], affine: np.ndarray,
                     config: ResampleConfig) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A (slice, row, col) HU volume on the spacing `config` asks for, with the matching spacing and affine."""
    targets = (config.slice_mm, config.pixel_mm, config.pixel_mm)
    out = volume.astype(np.float64)
    affine = np.array(affine, dtype=np.float64)
    new_spacing = []
    for axis, (old_mm, new_mm) in enumerate(zip(spacing, targets)):
        if new_mm is None or abs(new_mm - old_mm) <= 1e-6 * old_mm:
            new_spacing.append(float(old_mm))
            continue
        weights = box_resample_weights(out.shape[axis], old_mm, new_mm)
        out = np.moveaxis(np.tensordot(weights, np.moveaxis(out, axis, 0), axes=1), 0, axis)
        # New voxel 0's centre lies at old index (new_mm / old_mm - 1) / 2 along this axis.
        offset = np.zeros(3)
        offset[axis] = (new_mm / old_mm - 1) / 2
        affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
        affine[:3, axis] *= new_mm / old_mm
        new_spacing.append(float(new_mm))
    return out.astype(np.float32), tuple(new_spacing), affine


def thick_operator(thick: ThickSeries, n_thin: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, A): the thick slices that depend on the covered thin slices alone, and the matrix A with
    A @ thin[:covered] = those thick slices as the method made them from a thin series of `n_thin` slices.

    `subsample` rows pick the thin slice under each thick slice. Every other series is modelled as a slab
    average over its `thickness_mm` (simulate_thick's weights, truncated at the volume's ends, renormalised; for
    a real series the acquisition's slice profile to first order); a slab that reaches past the last thick
    position (into slices no method predicts) is left out.
    """
    n_thick = thick.array.shape[0]
    covered = int(thick.thin_indices[-1]) + 1
    if thick.method == "subsample":
        operator = np.zeros((n_thick, covered))
        operator[np.arange(n_thick), thick.thin_indices] = 1.0
        return np.arange(n_thick), operator
    thin_mm = thick.spacing_mm / thick.factor
    weights = np.stack([slab_weights(n_thin, int(centre), thick.thickness_mm / thin_mm)
                        for centre in thick.thin_indices])
    rows = np.nonzero(weights[:, covered:].sum(axis=1) == 0)[0]
    operator = weights[rows, :covered]
    return rows, operator / operator.sum(axis=1, keepdims=True)


def project_to_thick(prediction_hu: np.ndarray, thick: ThickSeries, n_thin: int) -> np.ndarray:
    """The closest (least-squares) thin series to `prediction_hu` whose thick series is the measured one.

    `prediction_hu` covers thin slices 0..(n_thick-1)*k of a volume of `n_thin` slices. With A from
    thick_operator, the projection is x + A^T (A A^T)^-1 (t - A x) per pixel column: for `subsample` it puts
    the thick slices back, for `slab_average` it spreads each slab's mismatch over the slab so that its
    average equals the measured thick slice.
    """
    covered = prediction_hu.shape[0]
    if covered != int(thick.thin_indices[-1]) + 1:
        raise ValueError(f"prediction has {covered} slices; the thick series covers {int(thick.thin_indices[-1]) + 1}")
    rows, operator = thick_operator(thick, n_thin)
    x = prediction_hu.reshape(covered, -1).astype(np.float64)
    measured = thick.array[rows].reshape(len(rows), -1).astype(np.float64)
    correction = operator.T @ np.linalg.solve(operator @ operator.T, measured - operator @ x)
    return (x + correction).reshape(prediction_hu.shape).astype(np.float32)
