"""Training views (data.augment): every slab phase and every axis of a training volume as the slice axis."""

from __future__ import annotations

import numpy as np
import pytest

from ctv2v.config import AugmentConfig, ThickConfig
from ctv2v.data.augment import training_views
from ctv2v.data.cache import Preprocessed
from ctv2v.data.thick import simulate_thick

THICK = ThickConfig(method="slab_average", factor=4)


def volume(shape=(40, 24, 28), spacing=(1.0, 1.0, 1.0)) -> Preprocessed:
    thin = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    return Preprocessed("v", thin, simulate_thick(thin, spacing[0], THICK), spacing, np.eye(4))


def test_every_axis_and_phase_is_a_view_with_its_own_simulated_thick_series():
    source = volume()
    views = training_views(source, AugmentConfig(slab_phases=True, axes=True), THICK)
    assert len(views) == 12 and views[0] is source
    ids = {view.volume_id for view in views[1:]}
    assert ids == {f"v:axis{a}:phase{p}" for a in range(3) for p in range(4)} - {"v:axis0:phase0"}
    for view in views[1:]:
        axis, phase = (int(part[-1]) for part in view.volume_id.split(":")[1:])
        np.testing.assert_array_equal(view.thin, np.moveaxis(source.thin, axis, 0)[phase:])
        np.testing.assert_allclose(view.thick.array, simulate_thick(view.thin, 1.0, THICK).array)
        assert view.thick.factor == 4


def test_without_augmentation_the_volume_is_its_only_view():
    source = volume()
    assert training_views(source, AugmentConfig()) == [source]
    assert [v.volume_id for v in training_views(source, AugmentConfig(slab_phases=True), THICK)] == [
        "v", "v:axis0:phase1", "v:axis0:phase2", "v:axis0:phase3"]


def test_in_plane_axes_only_leave_the_volumes_own_z_out():
    views = training_views(volume(), AugmentConfig(slab_phases=True), THICK, slice_axes=(1, 2))
    assert views and all(":axis0:" not in view.volume_id and view.volume_id != "v" for view in views)


def test_axes_on_an_anisotropic_grid_are_refused_naming_the_volume():
    with pytest.raises(ValueError, match=r"volume v has spacing \(3\.0, 0\.8, 0\.8\) mm.*isotropic"):
        training_views(volume(spacing=(3.0, 0.8, 0.8)), AugmentConfig(axes=True), THICK)


def test_an_axis_too_short_for_cubic_interpolation_gives_no_view():
    views = training_views(volume(shape=(40, 13, 28)), AugmentConfig(slab_phases=True, axes=True), THICK)
    # 13 rows give 4 thick slices at phase 0 only (13 - p slices need ceil(/4) >= 4).
    assert [v.volume_id for v in views if ":axis1:" in v.volume_id] == ["v:axis1:phase0"]
