"""Interpolation baselines along z: exact where they must be, refusing what they cannot do."""

from __future__ import annotations

import numpy as np
import pytest

from ctv2v.data.interpolation import METHODS, covered_slices, interpolate
from ctv2v.config import ThickConfig
from ctv2v.data.thick import simulate_thick


def _random_thin(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 300, (n, 5, 6)).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_subsampled_thick_slices_are_reproduced_exactly(method, factor):
    thin = _random_thin(23)
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=factor))
    rebuilt = interpolate(thick, thin.shape[0], method)
    assert rebuilt.shape == thin.shape and rebuilt.dtype == np.float32
    np.testing.assert_array_equal(rebuilt[thick.thin_indices], thin[thick.thin_indices])


@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_linear_ramp_along_z_is_rebuilt_exactly(method):
    z = np.arange(21, dtype=np.float32)
    ramp = np.broadcast_to((-500.0 + 37.5 * z)[:, None, None], (21, 4, 3)).copy()
    thick = simulate_thick(ramp, 1.0, ThickConfig(method="subsample", factor=4))
    rebuilt = interpolate(thick, 21, method)
    np.testing.assert_allclose(rebuilt, ramp, atol=1e-3)


def test_cubic_rebuilds_a_cubic_exactly_and_linear_does_not():
    z = np.arange(17, dtype=np.float64)
    values = (0.05 * (z - 8) ** 3).astype(np.float32)
    thin = np.broadcast_to(values[:, None, None], (17, 2, 2)).copy()
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=4))
    np.testing.assert_allclose(interpolate(thick, 17, "cubic"), thin, atol=1e-3)
    assert np.abs(interpolate(thick, 17, "linear") - thin).max() > 1.0


def test_nearest_copies_the_closest_thick_slice():
    thin = _random_thin(9)
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=4))  # thick at 0, 4, 8
    rebuilt = interpolate(thick, 9, "nearest")
    expected_source = [0, 0, 4, 4, 4, 4, 8, 8, 8]  # ties (2, 6) go to the later thick slice
    np.testing.assert_array_equal(rebuilt, thin[expected_source])


def test_slices_after_the_last_thick_position_hold_it_and_are_outside_the_covered_range():
    thin = _random_thin(11)
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=4))  # thick at 0, 4, 8
    assert covered_slices(thick) == 9
    rebuilt = interpolate(thick, 11, "linear")
    np.testing.assert_array_equal(rebuilt[9:], np.stack([thin[8], thin[8]]))


def test_slab_average_series_is_interpolated_from_its_own_values():
    thin = _random_thin(17)
    thick = simulate_thick(thin, 1.0, ThickConfig(method="slab_average", factor=4))
    rebuilt = interpolate(thick, 17, "linear")
    np.testing.assert_allclose(rebuilt[thick.thin_indices], thick.array)
    np.testing.assert_allclose(rebuilt[2], (thick.array[0] + thick.array[1]) / 2, rtol=1e-5, atol=1e-3)


def test_too_few_thin_slices_or_unknown_method_are_refused():
    thick = simulate_thick(_random_thin(9), 1.0, ThickConfig(method="subsample", factor=4))
    with pytest.raises(ValueError, match="n_thin=8 is shorter than the 9 thin slices"):
        interpolate(thick, 8, "linear")
    with pytest.raises(ValueError, match="unknown interpolation method 'spline'"):
        interpolate(thick, 9, "spline")
    with pytest.raises(ValueError, match="cubic interpolation needs at least 4 thick slices, got 3"):
        interpolate(thick, 9, "cubic")
