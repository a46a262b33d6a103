"""score_volume against hand-computed values, and its refusals of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from ctv2v.evaluate.metrics import (METRICS, SLICE_SETS, from_json, glossary, psnr, score_volume, synthesized_slices,
                                   to_json)

HU_MIN, HU_MAX = -1000.0, 1000.0
SHAPE = (13, 16, 16)  # the 3D SSIM needs 11 voxels along every axis


def _phantom(seed: int = 0) -> np.ndarray:
    """A smooth body-like volume in HU, well inside the [-1000, 1000] window."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    body = 40.0 + 300.0 * np.exp(-(x**2 + y**2) * 3) + 50.0 * z
    return (body + rng.normal(0, 20, SHAPE)).astype(np.float32)


def test_synthesized_slices_are_those_between_thick_positions():
    assert synthesized_slices(9, 4).tolist() == [1, 2, 3, 5, 6, 7]
    assert synthesized_slices(5, 2).tolist() == [1, 3]


def test_the_metric_table_lists_exactly_what_the_scorer_returns_and_reports_describe_each_row():
    """Adding a metric is one row of METRICS: a score without a row, or a row nothing scores, fails here."""
    scores = score_volume(_phantom(1), _phantom(), 4, HU_MIN, HU_MAX)
    assert list(scores) == list(SLICE_SETS)
    for slice_set in SLICE_SETS:
        assert set(scores[slice_set]) == {metric.name for metric in METRICS}
    described = glossary(-500, 1000)["metrics"]
    assert list(described) == [metric.name for metric in METRICS]
    assert described["psnr_db"] == "PSNR in dB, HU clipped to [-500, 1000], data range 1500 HU; higher is better"
    assert described["mae_hu"] == "mean absolute error in HU after clipping; lower is better"


def test_identical_volumes_score_perfectly():
    target = _phantom()
    scores = score_volume(target.copy(), target, 2, HU_MIN, HU_MAX)
    for subset in ("all", "synthesized"):
        assert scores[subset]["mae_hu"] == 0.0
        assert scores[subset]["psnr_db"] == math.inf
        assert scores[subset]["ssim_3d"] == pytest.approx(1.0, abs=1e-5)
        assert scores[subset]["ssim_2d"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("offset", [5.0, 40.0])
def test_constant_offset_gives_hand_computed_mae_and_psnr(offset):
    target = _phantom()
    scores = score_volume(target + offset, target, 4, HU_MIN, HU_MAX)
    expected_psnr = 20 * math.log10((HU_MAX - HU_MIN) / offset)
    for subset in ("all", "synthesized"):
        assert scores[subset]["mae_hu"] == pytest.approx(offset, rel=1e-5)
        assert scores[subset]["psnr_db"] == pytest.approx(expected_psnr, abs=1e-4)
        assert scores[subset]["ssim_2d"] < 1.0


def test_psnr_matches_numpy_formula_and_synthesized_subset_pools_only_those_slices():
    target = _phantom(1)
    pred = target.copy()
    # Errors only on thick positions 0, 4, 8, 12: the synthesized slices stay exact.
    pred[::4] += np.random.default_rng(2).normal(0, 30, pred[::4].shape).astype(np.float32)
    pred[5] += 100.0  # one synthesized slice wrong by 100 HU
    scores = score_volume(pred, target, 4, HU_MIN, HU_MAX)

    error = np.clip(pred, HU_MIN, HU_MAX).astype(np.float64) - np.clip(target, HU_MIN, HU_MAX)
    mse_all = np.mean(error**2)
    assert scores["all"]["psnr_db"] == pytest.approx(10 * math.log10(2000.0**2 / mse_all), abs=1e-4)
    assert scores["all"]["mae_hu"] == pytest.approx(np.mean(np.abs(error)), rel=1e-6)
    synthesized = [1, 2, 3, 5, 6, 7, 9, 10, 11]
    mse_syn = 100.0**2 / len(synthesized)  # one slice of nine is off by 100 everywhere
    assert scores["synthesized"]["psnr_db"] == pytest.approx(10 * math.log10(2000.0**2 / mse_syn), abs=1e-4)
    assert scores["synthesized"]["mae_hu"] == pytest.approx(100.0 / len(synthesized), rel=1e-5)


def test_values_are_clipped_to_the_hu_window_before_scoring():
    target = _phantom()
    target[0] = -3000.0  # outside the window on both sides
    pred = target.copy()
    pred[0] = -1500.0
    scores = score_volume(pred, target, 2, HU_MIN, HU_MAX)
    assert scores["all"]["mae_hu"] == 0.0


def test_ssim_matches_monai_and_per_slice_mean_uses_synthesized_slices():
    target = _phantom(3)
    pred = target.copy()
    pred[1] += np.random.default_rng(4).normal(0, 200, pred[1].shape).astype(np.float32)
    scores = score_volume(pred, target, 2, HU_MIN, HU_MAX)

    unit = lambda hu: torch.from_numpy((np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)).float()
    ssim_3d = SSIMMetric(spatial_dims=3, data_range=1.0)(unit(pred)[None, None], unit(target)[None, None])
    assert scores["all"]["ssim_3d"] == pytest.approx(float(ssim_3d), abs=1e-6)
    per_slice = SSIMMetric(spatial_dims=2, data_range=1.0)(unit(pred)[:, None], unit(target)[:, None])[:, 0]
    assert per_slice[1] < 0.9 and torch.all(per_slice[2:] > 0.9999)
    odd = per_slice[1::2].numpy()  # synthesized slices at x2: 1, 3, 5, ...
    assert scores["synthesized"]["ssim_2d"] == pytest.approx(float(odd.mean()), abs=1e-6)
    assert scores["all"]["ssim_2d"] == pytest.approx(float(per_slice.mean()), abs=1e-6)
    # The damaged slice is synthesized, so the synthesized scores are the worse ones.
    assert scores["synthesized"]["ssim_3d"] < scores["all"]["ssim_3d"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_prediction_is_an_error_not_a_score(bad):
    target = _phantom()
    pred = target.copy()
    pred[6, 3, 3] = bad
    with pytest.raises(ValueError, match=r"pred_hu .*1 NaN/Inf values in slices \[6\]"):
        score_volume(pred, target, 2, HU_MIN, HU_MAX)


def test_non_finite_target_is_an_error():
    target = _phantom()
    pred = target.copy()
    target[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="target_hu"):
        score_volume(pred, target, 2, HU_MIN, HU_MAX)


def test_shape_mismatch_names_both_shapes():
    target = _phantom()
    with pytest.raises(ValueError, match=r"pred_hu has shape \(12, 16, 16\) but target_hu has shape \(13, 16, 16\)"):
        score_volume(target[:12], target, 2, HU_MIN, HU_MAX)


def test_volume_smaller_than_the_ssim_window_is_refused():
    small = np.zeros((8, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="too small for SSIM"):
        score_volume(small, small, 2, HU_MIN, HU_MAX)


def test_volume_whose_3d_ssim_window_centres_hold_no_synthesized_slice_is_refused():
    # 11 slices: the only valid 3D window is centred on slice 5, a thick slice at x5.
    volume = np.zeros((11, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="no synthesized slice of 11"):
        score_volume(volume, volume, 5, HU_MIN, HU_MAX)


def test_psnr_of_arrays_and_tensors_follows_the_formula():
    target = _phantom()
    pred = target + np.random.default_rng(3).normal(0, 25, SHAPE).astype(np.float32)
    mse = np.mean((pred.astype(np.float64) - target) ** 2)
    assert psnr(pred, target, 2000.0) == pytest.approx(10 * math.log10(2000.0**2 / mse), abs=1e-6)
    assert psnr(torch.from_numpy(pred), torch.from_numpy(target), 2000.0) == pytest.approx(psnr(pred, target, 2000.0))
    assert psnr(target, target, 1.0) == math.inf
    with pytest.raises(ValueError, match="pred has shape"):
        psnr(pred[:3], target, 1.0)
    pred[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        psnr(pred, target, 1.0)


def test_infinite_scores_are_strict_json_and_read_back_as_floats():
    report = {"volume": "inf", "scores": {"psnr_db": math.inf, "mae_hu": 0.0}, "hu_range": (-1000.0, 1000.0)}
    text = to_json(report)
    assert '"psnr_db": "inf"' in text and "Infinity" not in text
    assert from_json(text) == {**report, "hu_range": [-1000.0, 1000.0]}  # a non-metric "inf" stays a string
    with pytest.raises(ValueError):
        to_json({"psnr_db": math.nan})
