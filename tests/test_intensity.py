"""HU <-> [0, 1]: the VAE's input contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctv2v.config import IntensityConfig
from ctv2v.intensity import Intensity


@pytest.mark.parametrize("hu_min, hu_max", [(-1000.0, 1000.0), (-1024.0, 3071.0), (-160.0, 240.0)])
def test_round_trip_within_half_a_hu(hu_min, hu_max):
    intensity = Intensity(hu_min, hu_max)
    hu = np.linspace(hu_min, hu_max, 100_001, dtype=np.float32)
    unit = intensity.to_unit(hu)
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert np.abs(intensity.to_hu(unit) - hu).max() < 0.5
    tensor = torch.from_numpy(hu)
    assert (intensity.to_hu(intensity.to_unit(tensor)) - tensor).abs().max() < 0.5


def test_values_outside_the_window_are_clipped():
    intensity = Intensity(-1000.0, 1000.0)
    hu = np.array([-3024.0, -1000.0, 0.0, 1000.0, 3071.0], dtype=np.float32)
    np.testing.assert_allclose(intensity.to_unit(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(intensity.to_unit(torch.from_numpy(hu)).numpy(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(intensity.to_hu(intensity.to_unit(hu)), [-1000.0, -1000.0, 0.0, 1000.0, 1000.0])


def test_from_config():
    assert Intensity.from_config(IntensityConfig(hu_min=-500, hu_max=500)) == Intensity(-500.0, 500.0)
