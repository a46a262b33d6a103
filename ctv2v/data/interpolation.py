"""Interpolation along z: the baselines (the thin series rebuilt from the thick one with no learning) and the
interpolation a model starts from (`Interpolation`, v2v.interpolation).

Thick slice j sits on thin slice j*k (ctv2v.data.thick), so the thick series covers thin indices
0..(n_thick-1)*k: the "covered range". Thin slices after the last thick position would need extrapolation,
which none of these baselines (nor the model) is asked to do; they are filled with the last thick slice so
the output keeps the thin series' length, and they are left out of every score (`covered_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.interpolate import make_interp_spline

from ctv2v.data.cache import Preprocessed
from ctv2v.data.thick import ThickSeries, project_to_thick

Method = Literal["nearest", "linear", "cubic"]
METHODS: tuple[Method, ...] = ("nearest", "linear", "cubic")
_SPLINE_DEGREE = {"linear": 1, "cubic": 3}


def covered_slices(thick: ThickSeries) -> int:
    """How many thin slices, from index 0, lie between the first and last thick positions (inclusive)."""
    return int(thick.thin_indices[-1]) + 1


def interpolate(thick: ThickSeries, n_thin: int, method: Method) -> np.ndarray:
    """The (n_thin, rows, cols) float32 thin series interpolated along z from the thick slices at j*k.

    `nearest` copies the closest thick slice (a tie halfway between two goes to the later one); `linear` and
    `cubic` are interpolating splines through the thick positions (cubic: not-a-knot, needs 4 thick slices).
    All three reproduce the thick slices exactly at their own positions.
    """
    n_thick = thick.array.shape[0]
    covered = covered_slices(thick)
    if n_thin < covered:
        raise ValueError(f"n_thin={n_thin} is shorter than the {covered} thin slices the thick series covers")
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "cubic" and n_thick < 4:
        raise ValueError(f"cubic interpolation needs at least 4 thick slices, got {n_thick}")
    if method == "linear" and n_thick < 2:
        raise ValueError(f"linear interpolation needs at least 2 thick slices, got {n_thick}")

    targets = np.arange(covered)
    thin = np.empty((n_thin,) + thick.array.shape[1:], dtype=np.float32)
    if method == "nearest":
        thin[:covered] = thick.array[np.floor(targets / thick.factor + 0.5).astype(int)]
    else:
        spline = make_interp_spline(thick.thin_indices, thick.array.astype(np.float64),
                                    k=_SPLINE_DEGREE[method], axis=0)
        thin[:covered] = spline(targets)
        # Evaluating the spline at its knots is exact only up to rounding; the thick slices are the data.
        thin[thick.thin_indices] = thick.array
    thin[covered:] = thick.array[-1]
    return thin


@dataclass(frozen=True)
class Interpolation:
    """The image-space interpolation of a volume's thick series on its thin grid that a model uses (v2v)."""

    method: Method
    consistent: bool = False
    """Covered slices projected onto the measured thick series (ctv2v.data.thick.project_to_thick)."""

    def of(self, volume: Preprocessed) -> np.ndarray:
        """The interpolated volume in HU, same shape as `volume.thin`."""
        interpolated = interpolate(volume.thick, volume.thin.shape[0], self.method)
        if self.consistent:
            covered = covered_slices(volume.thick)
            interpolated[:covered] = project_to_thick(interpolated[:covered], volume.thick, volume.thin.shape[0])
        return interpolated
