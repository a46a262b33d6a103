"""The interpolation-baseline report: every volume x thick factor x method, scored in HU on the covered range.

Each volume of a dataset folder is read and its thick series made at each factor k by the data package
(ctv2v.data.cache: simulated per data.thick, or a real paired thick series), rebuilt by nearest / linear /
cubic interpolation along z (ctv2v.data.interpolation) and scored against the thin series (ctv2v.evaluate.metrics). Only
the covered range, thin slices 0..(n_thick-1)*k, is scored: the few slices after the last thick position
would need extrapolation. The HU window and how the thick slices were made move the numbers by several dB,
so both are written into every JSON file and into the table's title and rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctv2v.data.interpolation import METHODS, Method, covered_slices, interpolate
from ctv2v.config import DataConfig, ThickConfig
from ctv2v.data.cache import PreprocessCache, preprocess
from ctv2v.data.manifest import build_manifest
from ctv2v.data.thick import ThickSeries
from ctv2v.files import atomic_write_text
from ctv2v.evaluate.metrics import (
    HEADLINE,
    METRIC_BY_NAME,
    METRIC_NAMES,
    METRICS,
    SLICE_SET_LABELS,
    SLICE_SET_MEANING,
    SLICE_SETS,
    column_label,
    glossary,
    score_volume,
    to_json,
)

log = logging.getLogger(__name__)

REPORT_VERSION = 1
AGGREGATE_FILE = "baselines.json"
TABLE_FILE = "baselines.md"
VOLUMES_DIR = "volumes"
TABLE_COLUMNS = [(METRIC_BY_NAME[HEADLINE[0]], "all"), *((metric, "synthesized") for metric in METRICS)]
"""The Markdown table's metric columns: the headline metric over all slices, every metric over synthesized ones."""


SliceSetScores = dict[str, dict[str, float]]
"""Slice set (SLICE_SETS) -> metric (METRIC_NAMES) -> value."""


@dataclass
class BaselineResult:
    """One method's rebuild of one volume's thin series at one thick factor, scored on the covered range."""

    factor: int
    method: str
    thick: str
    """How this thick series was made (ThickSeries.describe)."""
    thick_method: str
    scored_slices: int
    synthesized_slices: int
    scores: SliceSetScores

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the settings, then one entry per slice set."""
        return {"factor": self.factor, "method": self.method, "thick": self.thick, "thick_method": self.thick_method,
                "scored_slices": self.scored_slices, "synthesized_slices": self.synthesized_slices, **self.scores}


@dataclass
class VolumeBaselines:
    """Every result of one volume, with the manifest entry that identifies it."""

    volume: str
    path: str
    sha256: str
    shape: list[int]
    spacing_mm: list[float]
    results: list[BaselineResult]

    def to_dict(self) -> dict[str, Any]:
        return {"volume": self.volume, "path": self.path, "sha256": self.sha256, "shape": self.shape,
                "spacing_mm": self.spacing_mm, "results": [r.to_dict() for r in self.results]}


@dataclass
class MeanBaseline:
    """One method's scores at one factor, averaged over `volumes` volumes."""

    factor: int
    method: str
    volumes: int
    scores: SliceSetScores

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "method": self.method, "volumes": self.volumes, **self.scores}


@dataclass
class BaselineReport:
    """The baseline report: its settings (with the metric glossary in the JSON form), per-volume results, means."""

    dataset: str
    hu_range: list[float]
    thick_method: dict[str, Any]
    """data.thick's method and thickness_mm, and a one-line summary of how thick slices were made."""
    factors: list[int]
    methods: list[str]
    volumes: list[VolumeBaselines]
    mean_over_volumes: list[MeanBaseline]
    report_version: int = REPORT_VERSION

    def settings(self) -> dict[str, Any]:
        """What every JSON file of the report states: version, HU window, thick-slice method, metric glossary."""
        return {"report_version": self.report_version, "hu_range": self.hu_range, "thick_method": self.thick_method,
                **glossary(*self.hu_range)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the whole report (AGGREGATE_FILE)."""
        return {**self.settings(), "dataset": self.dataset, "factors": self.factors, "methods": self.methods,
                "volumes": [v.to_dict() for v in self.volumes],
                "mean_over_volumes": [m.to_dict() for m in self.mean_over_volumes]}


def _thick_settings(thick: ThickConfig) -> dict:
    if thick.method == "subsample":
        summary = "subsample: every k-th thin slice kept"
    else:
        extent = (f"{thick.thickness_mm:g} mm" if thick.thickness_mm is not None
                  else "the thick spacing (k x thin spacing)")
        summary = f"slab_average: thin slices averaged over {extent} around each thick position"
    return {"method": thick.method, "thickness_mm": thick.thickness_mm, "summary": summary}


def score_baselines(thin: np.ndarray, thick: ThickSeries, hu_min: float, hu_max: float,
                    methods: Sequence[Method] = METHODS) -> list[BaselineResult]:
    """One result per method: the thin series rebuilt from `thick` and scored on the covered range."""
    covered = covered_slices(thick)
    if thin.shape[0] < covered:
        raise ValueError(f"thin volume has {thin.shape[0]} slices but its thick series covers {covered}")
    results = []
    for method in methods:
        rebuilt = interpolate(thick, thin.shape[0], method)
        scores = score_volume(rebuilt[:covered], thin[:covered], thick.factor, hu_min, hu_max)
        results.append(BaselineResult(factor=thick.factor, method=method, thick=thick.describe(),
                                      thick_method=thick.method, scored_slices=covered,
                                      synthesized_slices=covered - thick.array.shape[0], scores=scores))
    return results


def baseline_report(
    dataset_dir: Path,
    data: DataConfig,
    factors: Sequence[int] = (2, 4),
    hu_min: float = -1000.0,
    hu_max: float = 1000.0,
    methods: Sequence[Method] = METHODS,
    volume_ids: Sequence[str] | None = None,
    cache: PreprocessCache | None = None,
) -> BaselineReport:
    """Score every method on every volume of a dataset folder at every factor, thick series made per `data.thick`.

    `volume_ids` restricts the report to those manifest ids; `cache` (a PreprocessCache) keeps the decoded
    volumes and thick series for the next run, without it every volume is read from the dataset folder.
    """
    if not factors or any(isinstance(k, bool) or int(k) != k or k < 2 for k in factors):
        raise ValueError(f"factors must be integers >= 2, got {list(factors)}")
    if len(set(factors)) != len(factors):
        raise ValueError(f"factors must not repeat, got {list(factors)}")
    if not hu_max > hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be among {list(METHODS)}, got {list(methods)}")

    per_volume: dict[str, VolumeBaselines] = {}
    for factor in factors:
        data_k = data.model_copy(update={"thick": data.thick.model_copy(update={"factor": int(factor)})})
        manifest = build_manifest(dataset_dir, data_k.split, data_k.thick, data_k.slice_spacing_tolerance,
                                  data_k.max_volume_bytes)
        entries = _select(manifest["volumes"], volume_ids, dataset_dir)
        for entry in entries:
            volume = (cache.load(dataset_dir, entry, data_k) if cache is not None
                      else preprocess(dataset_dir, entry, data_k))
            log.info("%s x%d: %s", entry["id"], factor, volume.thick_description)
            record = per_volume.setdefault(entry["id"], VolumeBaselines(
                volume=entry["id"], path=entry["path"], sha256=entry["sha256"], shape=entry["shape"],
                spacing_mm=entry["spacing"], results=[]))
            record.results.extend(score_baselines(volume.thin, volume.thick, hu_min, hu_max, methods))

    volumes = list(per_volume.values())
    return BaselineReport(dataset=str(Path(dataset_dir).resolve()), hu_range=[hu_min, hu_max],
                          thick_method=_thick_settings(data.thick), factors=[int(k) for k in factors],
                          methods=list(methods), volumes=volumes, mean_over_volumes=_means(volumes, factors, methods))


def _select(entries: list[dict], volume_ids: Sequence[str] | None, dataset_dir: Path) -> list[dict]:
    if volume_ids is None:
        return entries
    if len(set(volume_ids)) != len(volume_ids):
        raise ValueError(f"volume ids must not repeat, got {list(volume_ids)}")
    known = {entry["id"]: entry for entry in entries}
    missing = [v for v in volume_ids if v not in known]
    if missing:
        raise ValueError(f"{dataset_dir}: no volume with id {missing}; its volume ids are {sorted(known)}")
    return [known[v] for v in volume_ids]


def _means(per_volume: list[VolumeBaselines], factors: Sequence[int], methods: Sequence[str]) -> list[MeanBaseline]:
    means = []
    for factor in factors:
        for method in methods:
            rows = [r for v in per_volume for r in v.results if r.factor == factor and r.method == method]
            means.append(MeanBaseline(factor=factor, method=method, volumes=len(rows), scores={
                subset: {name: float(np.mean([r.scores[subset][name] for r in rows])) for name in METRIC_NAMES}
                for subset in SLICE_SETS}))
    return means


def title(report: BaselineReport) -> str:
    """One line stating the HU window, the thick-slice method and the scored range of a report."""
    hu_min, hu_max = report.hu_range
    return (f"Interpolation baselines - HU window [{hu_min:g}, {hu_max:g}] - thick slices: "
            f"{report.thick_method['summary']} - scored: thin slices from the first to the last thick slice")


def format_table(report: BaselineReport) -> str:
    """The report as a Markdown table: one row per volume, factor and method, then the means over volumes."""
    header = ("| volume | factor | thick series | method | "
              + " | ".join(column_label(metric, slice_set) for metric, slice_set in TABLE_COLUMNS) + " |")
    lines = [f"**{title(report)}**", "", header, "|" + " --- |" * (header.count("|") - 1)]

    def row(volume: str, thick: str, r: BaselineResult | MeanBaseline) -> str:
        cells = [metric.format(r.scores[slice_set][metric.name]) for metric, slice_set in TABLE_COLUMNS]
        return f"| {volume} | x{r.factor} | {thick} | {r.method} | " + " | ".join(cells) + " |"

    for volume in report.volumes:
        for r in volume.results:
            lines.append(row(volume.volume, r.thick, r))
    if len(report.volumes) > 1:
        for r in report.mean_over_volumes:
            lines.append(row(f"mean of {r.volumes} volumes", report.thick_method["method"], r))
    lines += ["", f"{SLICE_SET_LABELS['synthesized']} = {SLICE_SET_MEANING['synthesized']}; SSIM on the HU window "
                  "mapped to [0, 1]."]
    return "\n".join(lines) + "\n"


def write_report(report: BaselineReport, out_dir: Path) -> list[Path]:
    """Write volumes/<id>.json per volume, the aggregate JSON and the Markdown table into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    written = []
    for volume in report.volumes:
        path = out_dir / VOLUMES_DIR / f"{volume.volume}.json"
        atomic_write_text(path, to_json({**report.settings(), **volume.to_dict()}))
        written.append(path)
    for path, text in ((out_dir / AGGREGATE_FILE, to_json(report.to_dict())), (out_dir / TABLE_FILE,
                                                                               format_table(report))):
        atomic_write_text(path, text)
        written.append(path)
    return written
