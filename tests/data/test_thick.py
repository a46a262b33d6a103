"""Thick-slice simulation: slab-averaging weights, subsampling, errors."""

from __future__ import annotations

import numpy as np
import pytest

from ctv2v.config import ThickConfig
from ctv2v.data.thick import simulate_thick, slab_weights


def test_slab_weights_k2_by_hand():
    # Slab [c-1, c+1] around c=4: thin slice 3 covers [2.5, 3.5] -> 0.5 inside, 4 -> 1, 5 -> 0.5.
    np.testing.assert_allclose(slab_weights(9, 4, 2.0), [0, 0, 0, 0.5, 1, 0.5, 0, 0, 0])
    # At the volume's start the slab is truncated: only slices 0 (fully) and 1 (half).
    np.testing.assert_allclose(slab_weights(9, 0, 2.0), [1, 0.5, 0, 0, 0, 0, 0, 0, 0])


def test_slab_weights_k4_by_hand():
    np.testing.assert_allclose(slab_weights(13, 8, 4.0), [0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0])
    # A 6 mm slab on 2 mm slices (3 slice thicknesses): [c-1.5, c+1.5].
    np.testing.assert_allclose(slab_weights(7, 3, 3.0), [0, 0, 1, 1, 1, 0, 0])


def test_slab_average_values_by_hand():
    thin = np.zeros((9, 1, 1), dtype=np.float32)
    thin[:, 0, 0] = [0, 10, 20, 30, 40, 50, 60, 70, 80]
    thick = simulate_thick(thin, 1.0, ThickConfig(method="slab_average", factor=2))
    # Centres 0, 2, 4, 6, 8; interior weights (0.5, 1, 0.5) / 2; at the ends (1, 0.5) / 1.5.
    expected = [(1 * 0 + 0.5 * 10) / 1.5, 20, 40, 60, (0.5 * 70 + 1 * 80) / 1.5]
    np.testing.assert_allclose(thick.array[:, 0, 0], expected, rtol=1e-6)
    assert thick.array.dtype == np.float32 and thick.spacing_mm == 2.0 and thick.thickness_mm == 2.0
    thin[:, 0, 0] = [5, 1, 9, 3, 7, 0, 2, 8, 4]
    thick4 = simulate_thick(thin, 1.0, ThickConfig(method="slab_average", factor=4))
    # Centre 4: slices 2..6 with weights (0.5, 1, 1, 1, 0.5) / 4.
    assert thick4.array[1, 0, 0] == pytest.approx((0.5 * 9 + 3 + 7 + 0 + 0.5 * 2) / 4)
    assert thick4.thin_indices.tolist() == [0, 4, 8]


def test_slab_thickness_in_mm_uses_the_thin_spacing():
    thin = np.arange(12, dtype=np.float32).reshape(12, 1, 1)
    thick = simulate_thick(thin, 2.0, ThickConfig(factor=3, thickness_mm=2.0))
    # A 2 mm slab on 2 mm slices is exactly the centre slice.
    np.testing.assert_allclose(thick.array[:, 0, 0], [0, 3, 6, 9])
    assert thick.spacing_mm == 6.0 and "slab average over 2 mm every 6 mm" in thick.describe()


def test_subsample_picks_every_kth_slice():
    thin = np.random.default_rng(0).normal(size=(11, 3, 4)).astype(np.float32)
    thick = simulate_thick(thin, 1.5, ThickConfig(method="subsample", factor=3))
    np.testing.assert_array_equal(thick.array, thin[[0, 3, 6, 9]])
    assert thick.describe() == "one thin slice in 3 kept (spacing 4.5 mm)"


def test_errors():
    with pytest.raises(ValueError, match=r"thin volume has 4 slices; x4 needs at least 5"):
        simulate_thick(np.zeros((4, 2, 2), np.float32), 1.0, ThickConfig(factor=4))
    with pytest.raises(ValueError, match=r"must be \(slice, row, col\), got shape \(4, 2\)"):
        simulate_thick(np.zeros((4, 2), np.float32), 1.0, ThickConfig(factor=2))
