"""Image-quality metrics of a thin-slice prediction against the true thin series, in HU, with MONAI's metrics.

Both volumes are clipped to [hu_min, hu_max] first; that window moves PSNR by ~6 dB, so every report states
it. PSNR uses the window width as its data range and MAE is in HU. SSIM is computed on the window mapped to
[0, 1] (ctv2v.intensity) with data range 1: SSIM's luminance term is not shift invariant, so SSIM "in HU"
would depend on where zero HU sits, and float32 variances of raw HU squared (~1e6) lose the small local
contrasts SSIM measures.

Every metric is reported over two slice sets of the scored (slice, row, col) volume:
- `all`: every thin slice;
- `synthesized`: the thin slices a method had to make up, i.e. indices that are not a multiple of the thick
  factor k (thick slice j sits on thin slice j*k, ctv2v.data.thick).
PSNR and MAE over `synthesized` pool the squared / absolute errors of those slices. The 2D SSIM is the mean
of MONAI's per-slice SSIM over the set. The 3D SSIM's `all` value is MONAI's SSIMMetric (mean of the 3D SSIM
map, 11-voxel Gaussian window, valid positions only); its `synthesized` value is the mean of the same map
over the window positions centred on a synthesized slice (the window itself spans neighbouring slices).
A perfect prediction has infinite PSNR; a NaN or Inf in either input is an error, never a score.

This module also holds the metric table (METRICS: name, table label, digits, direction, description) that every
table, report, validation log and pipeline output reads, what every report says about these numbers (`glossary`)
and how scores are written
to JSON (`to_json` / `from_json`): JSON has no infinity, so an infinite score is written as the string "inf"
(strict JSON that any reader parses) and read back as a float.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

from ctv2v.intensity import Intensity

SSIM_WINDOW = 11
"""MONAI's default Gaussian window (sigma 1.5); a 3D SSIM needs at least this many slices, rows and columns."""
SSIM_SIGMA = 1.5


@dataclass(frozen=True)
class Metric:
    """One score of `score_volume`, as every table, report, validation log and pipeline output shows it."""

    name: str
    """Its key in score dicts, report JSON and MLflow / KFP metric names."""
    label: str
    """Its column label in Markdown and HTML tables."""
    digits: int
    """Decimals printed in tables."""
    higher_is_better: bool
    description: str
    """What it measures, for report glossaries; `{hu_min}`, `{hu_max}` and `{width}` stand for the HU window."""

    def format(self, value: float) -> str:
        """`value` as a table prints it ("inf" for a perfect PSNR)."""
        return f"{value:.{self.digits}f}"

    def describe(self, hu_min: float, hu_max: float) -> str:
        """The description under the HU window [hu_min, hu_max], with the direction that is better."""
        meaning = self.description.format(hu_min=f"{hu_min:g}", hu_max=f"{hu_max:g}", width=f"{hu_max - hu_min:g}")
        return f"{meaning}; {'higher' if self.higher_is_better else 'lower'} is better"


METRICS: tuple[Metric, ...] = (
    Metric("psnr_db", "PSNR dB", 2, True, "PSNR in dB, HU clipped to [{hu_min}, {hu_max}], data range {width} HU"),
    Metric("ssim_3d", "SSIM-3D", 4, True,
           f"MONAI SSIM 3D (Gaussian window {SSIM_WINDOW}, sigma {SSIM_SIGMA:g}) on the HU window mapped to [0, 1]; "
           "over a slice set: mean of the SSIM map at window centres on those slices"),
    Metric("ssim_2d", "SSIM-2D", 4, True, "MONAI SSIM 2D of each axial slice, averaged over the slice set"),
    Metric("mae_hu", "MAE HU", 1, False, "mean absolute error in HU after clipping"),
)
"""Every metric `score_volume` returns, in table order: adding a metric is a row here and its score there."""
METRIC_BY_NAME = {metric.name: metric for metric in METRICS}
METRIC_NAMES = tuple(METRIC_BY_NAME)
SLICE_SETS = ("all", "synthesized")
SLICE_SET_LABELS = {"all": "all", "synthesized": "synth."}
"""How table column labels name each slice set, e.g. `PSNR dB (synth.)`."""
HEADLINE = ("psnr_db", "synthesized")
"""The number a verdict is stated on and a registered model ranked by: PSNR over the slices a method had to
synthesize."""
SCORED_RANGE = ("thin slices 0..(n_thick-1)*k, from the first to the last thick position; the slices after the "
                "last thick position would need extrapolation and are not scored")
SLICE_SET_MEANING = {
    "all": "every thin slice of the scored range",
    "synthesized": "thin slices of the scored range that no thick slice sits on (index not a multiple of k)",
}
AGGREGATE_OVER = "mean over volumes of each volume's metric"


def column_label(metric: Metric, slice_set: str) -> str:
    """A table column's label: the metric's label and the slice set, e.g. `PSNR dB (synth.)`."""
    return f"{metric.label} ({SLICE_SET_LABELS[slice_set]})"


def describe_metrics(hu_min: float, hu_max: float) -> dict[str, str]:
    """What each metric name means under the window [hu_min, hu_max], for reports."""
    return {metric.name: metric.describe(hu_min, hu_max) for metric in METRICS}


def glossary(hu_min: float, hu_max: float) -> dict[str, Any]:
    """What a report's numbers mean: the scored range, the slice sets, each metric, how volumes are averaged."""
    return {
        "scored_range": SCORED_RANGE,
        "slice_sets": dict(SLICE_SET_MEANING),
        "metrics": describe_metrics(hu_min, hu_max),
        "aggregate_over": AGGREGATE_OVER,
    }


# ---------------------------------------------------------------------------------------------- JSON
INFINITY = {math.inf: "inf", -math.inf: "-inf"}


def _finite_json(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _finite_json(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite_json(value) for value in node]
    if isinstance(node, float) and math.isinf(node):
        return INFINITY[node]
    return node


def to_json(data: Any) -> str:
    """Indented strict JSON of a report; infinite scores become "inf" / "-inf", a NaN is an error."""
    return json.dumps(_finite_json(data), indent=2, allow_nan=False) + "\n"


def _scores_from_json(node: dict[str, Any]) -> dict[str, Any]:
    return {key: float(value) if key in METRIC_NAMES and value in INFINITY.values() else value
            for key, value in node.items()}


def from_json(text: str) -> Any:
    """Inverse of to_json: the "inf" / "-inf" values of metric names (METRIC_NAMES) become floats again."""
    return json.loads(text, object_hook=_scores_from_json)


# ------------------------------------------------------------------------------------------- scoring
def synthesized_slices(n_slices: int, thick_factor: int) -> np.ndarray:
    """Thin-slice indices that no thick slice sits on (not a multiple of `thick_factor`)."""
    if thick_factor < 2:
        raise ValueError(f"thick_factor must be at least 2, got {thick_factor}")
    indices = np.arange(n_slices)
    return indices[indices % thick_factor != 0]


def _check_inputs(pred_hu: np.ndarray, target_hu: np.ndarray) -> None:
    for name, array in (("pred_hu", pred_hu), ("target_hu", target_hu)):
        if array.ndim != 3:
            raise ValueError(f"{name} must be (slice, row, col), got shape {array.shape}")
    if pred_hu.shape != target_hu.shape:
        raise ValueError(f"pred_hu has shape {pred_hu.shape} but target_hu has shape {target_hu.shape}")
    small = [dim for dim in pred_hu.shape if dim < SSIM_WINDOW]
    if small:
        raise ValueError(f"volumes of shape {pred_hu.shape} are too small for SSIM's {SSIM_WINDOW}-voxel window")
    for name, array in (("pred_hu", pred_hu), ("target_hu", target_hu)):
        bad = ~np.isfinite(array)
        if bad.any():
            slices = np.unique(np.nonzero(bad)[0])
            raise ValueError(
                f"{name} (shape {array.shape}) has {int(bad.sum())} NaN/Inf values in slices {slices[:10].tolist()}"
                + (" ..." if len(slices) > 10 else "")
            )


def _as_batch(array: np.ndarray) -> torch.Tensor:
    """(slice, row, col) -> (1, 1, slice, row, col), as MONAI's metrics take it."""
    return torch.from_numpy(np.ascontiguousarray(array))[None, None]


def psnr(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, data_range: float) -> float:
    """PSNR in dB of `pred` against `target` (same shape) for signals spanning `data_range`; inf when they are equal."""
    pred_t, target_t = torch.as_tensor(pred), torch.as_tensor(target)
    if pred_t.shape != target_t.shape:
        raise ValueError(f"psnr: pred has shape {tuple(pred_t.shape)} but target has shape {tuple(target_t.shape)}")
    for name, tensor in (("pred", pred_t), ("target", target_t)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"psnr: {name} (shape {tuple(tensor.shape)}) has NaN/Inf values")
    # float64: pooled squared errors of millions of voxels keep their precision; MONAI's metric takes (B, C, ...).
    value = PSNRMetric(max_val=data_range)(pred_t.double().reshape(1, 1, -1), target_t.double().reshape(1, 1, -1))
    return float(value.item())


def _psnr_mae(pred: np.ndarray, target: np.ndarray, data_range: float) -> tuple[float, float]:
    mae = MAEMetric()(_as_batch(pred), _as_batch(target))
    return psnr(pred, target, data_range), float(mae.item())


def score_volume(
    pred_hu: np.ndarray, target_hu: np.ndarray, thick_factor: int, hu_min: float, hu_max: float
) -> dict[str, dict[str, float]]:
    """PSNR (dB), SSIM 3D, SSIM 2D (mean over axial slices) and MAE (HU), over `all` and `synthesized` slices."""
    pred_hu = np.asarray(pred_hu)
    target_hu = np.asarray(target_hu)
    _check_inputs(pred_hu, target_hu)
    window = Intensity(hu_min, hu_max)
    synthesized = synthesized_slices(pred_hu.shape[0], thick_factor)
    if len(synthesized) == 0:
        raise ValueError(f"{pred_hu.shape[0]} slices at x{thick_factor} contain no synthesized slice to score")

    # float64 so that pooled squared errors of millions of voxels keep their precision.
    pred_clipped = np.clip(pred_hu.astype(np.float64), hu_min, hu_max)
    target_clipped = np.clip(target_hu.astype(np.float64), hu_min, hu_max)
    psnr_all, mae_all = _psnr_mae(pred_clipped, target_clipped, window.width)
    psnr_syn, mae_syn = _psnr_mae(pred_clipped[synthesized], target_clipped[synthesized], window.width)

    pred_unit = torch.from_numpy(window.to_unit(pred_hu))
    target_unit = torch.from_numpy(window.to_unit(target_hu))
    per_slice = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA)(
        pred_unit[:, None], target_unit[:, None]
    )[:, 0].numpy()
    ssim_map, _ = compute_ssim_and_cs(
        pred_unit[None, None], target_unit[None, None], spatial_dims=3,
        kernel_size=[SSIM_WINDOW] * 3, kernel_sigma=[SSIM_SIGMA] * 3, data_range=1.0,
    )
    # MONAI's map has valid positions only: its depth d holds the windows centred on slice d + SSIM_WINDOW // 2.
    ssim_3d_by_depth = ssim_map[0, 0].mean(dim=(1, 2)).numpy()
    synthesized_depths = synthesized - SSIM_WINDOW // 2
    synthesized_depths = synthesized_depths[(synthesized_depths >= 0) & (synthesized_depths < len(ssim_3d_by_depth))]
    if len(synthesized_depths) == 0:
        raise ValueError(f"no synthesized slice of {pred_hu.shape[0]} lies inside the 3D SSIM window's valid range")

    return {
        "all": {
            "psnr_db": psnr_all,
            "ssim_3d": float(ssim_3d_by_depth.mean()),
            "ssim_2d": float(per_slice.mean()),
            "mae_hu": mae_all,
        },
        "synthesized": {
            "psnr_db": psnr_syn,
            "ssim_3d": float(ssim_3d_by_depth[synthesized_depths].mean()),
            "ssim_2d": float(per_slice[synthesized].mean()),
            "mae_hu": mae_syn,
        },
    }
