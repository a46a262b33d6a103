"""Training views of a volume: every slab phase, every axis as the slice axis (data.augment).

A view is a Preprocessed volume whose thin series is the training volume with axis `axis` moved first and its
first `phase` slices dropped, and whose thick series is simulated from that (data.thick), so its thick slices sit
on thin slices phase + j*k of the original axis. View (axis 0, phase 0) is the volume itself, with its own thick
series (a real paired one stays real). One training patient then offers 3 k differently sampled volumes whose
through-plane residuals the model learns from (shared/FIELD_NOTES.md, calibration: +0.37 -> +0.67 dB).
"""

from __future__ import annotations

import logging

import numpy as np

from ctv2v.config import AugmentConfig, ThickConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.data.thick import simulate_thick

log = logging.getLogger(__name__)

ISOTROPY_TOLERANCE = 0.01
"""Relative spread of the three spacings under which a volume counts as isotropic (data.augment.axes)."""
MIN_THICK_SLICES = 4
"""Cubic interpolation, the models' start, needs 4 thick slices; shorter views are not made."""


def check_isotropic(volume: Preprocessed) -> None:
    """Raise ValueError naming the volume and its spacing unless its three spacings agree (data.augment.axes)."""
    spacing = np.asarray(volume.spacing, dtype=float)
    if spacing.max() - spacing.min() > ISOTROPY_TOLERANCE * spacing.min():
        raise ValueError(
            f"data.augment.axes: volume {volume.volume_id} has spacing {tuple(volume.spacing)} mm; each "
            "axis can be the slice axis only on an isotropic grid: set data.resample.slice_mm and pixel_mm to "
            "one value, or data.augment.axes: false")


def training_views(volume: Preprocessed, augment: AugmentConfig, thick: ThickConfig | None = None,
                   slice_axes: tuple[int, ...] | None = None) -> list[Preprocessed]:
    """The views of `volume` that data.augment asks for, (axis 0, phase 0) first when axis 0 is a slice axis.

    `slice_axes` overrides the axes data.augment.axes gives (0 alone, or all three): test-time adaptation
    (ctv2v.evaluate.adapt) uses the in-plane axes (1, 2) only, the volume's own z holding no thin truth.
    """
    axes = slice_axes if slice_axes is not None else (0, 1, 2) if augment.axes else (0,)
    if axes != (0,):
        check_isotropic(volume)
    k = volume.thick.factor
    if (axes != (0,) or augment.slab_phases) and thick is None:
        raise ValueError("data.augment.slab_phases / axes simulate thick series: pass the data.thick settings")
    if thick is not None and thick.factor != k:
        raise ValueError(f"training volume {volume.volume_id} has thick factor {k}, data.thick.factor is "
                         f"{thick.factor}")
    views = [volume] if 0 in axes else []
    for axis in axes:
        moved = np.moveaxis(volume.thin, axis, 0)
        for phase in range(k) if augment.slab_phases else (0,):
            if axis == 0 and phase == 0:
                continue
            thin = np.ascontiguousarray(moved[phase:])
            if -(-thin.shape[0] // k) < MIN_THICK_SLICES:
                log.info("%s: no view with axis %d as the slice axis at phase %d: %d slices give fewer than %d "
                         "thick slices", volume.volume_id, axis, phase, thin.shape[0], MIN_THICK_SLICES)
                continue
            spacing = float(volume.spacing[axis])
            views.append(Preprocessed(f"{volume.volume_id}:axis{axis}:phase{phase}", thin,
                                      simulate_thick(thin, spacing, thick), (spacing,) * 3, volume.affine))
    return views


def validation_views(volume: Preprocessed, augment: AugmentConfig, thick: ThickConfig) -> list[Preprocessed]:
    """The views validation scores: with data.augment.axes, every axis of the (isotropic) val volume as the slice
    axis at phase 0, else the volume itself.

    A val series of few slices (the demo's: 13 at 3 mm) holds only a few thick slabs along its own z; its in-plane
    axes offer the long through-plane stretches the model is trained on, in anatomy it never saw.
    """
    return training_views(volume, augment.model_copy(update={"slab_phases": False}), thick)
