"""`ctv2v data baselines` end to end on real demo CT, and the report files it writes."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml

from ctv2v.config import DataConfig, ThickConfig
from ctv2v.data.demo import fetch_demo
from ctv2v.data.prepared import PreparedDataError
from ctv2v.data.readers import read_volume
from ctv2v.data.thick import simulate_thick
from ctv2v.evaluate.baseline_report import (BaselineReport, VolumeBaselines, baseline_report, format_table,
                                            score_baselines, write_report)
from ctv2v.evaluate.metrics import METRIC_BY_NAME, from_json
from pipeline.cli import main
from tests.conftest import REPO

REPO_CONFIG = "configs/smoke.yaml"
SMALL_VOLUME = "example_ct_sm"  # 30 slices of 122 x 101 at 3 mm


@pytest.fixture(scope="module")
def demo_dir():
    """The verified demo dataset folder (downloaded once into the user's cache on first use)."""
    return fetch_demo()


def _run_cli(tmp_path, *extra: str) -> int:
    return main(["data", "baselines", "--config", str(REPO / REPO_CONFIG), "--set", f"data.workspace={tmp_path / 'ws'}",
                 "--out", str(tmp_path / "out"), *extra])


def test_cli_on_the_demo_writes_reports_that_state_hu_range_and_thick_method(tmp_path, demo_dir, capsys):
    assert _run_cli(tmp_path, "--volumes", SMALL_VOLUME, "--set", "evaluation.hu_min=-1024") == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"

    report = json.loads((out / "baselines.json").read_text())
    per_volume = json.loads((out / "volumes" / f"{SMALL_VOLUME}.json").read_text())
    for data in (report, per_volume):
        assert data["hu_range"] == [-1024.0, 1000.0]
        assert data["thick_method"]["method"] == "slab_average"
    thick_2 = simulate_thick(read_volume(demo_dir / f"{SMALL_VOLUME}.nii.gz").array, 3.0,
                             ThickConfig(method="slab_average", factor=2)).describe()
    rows = {(r["factor"], r["method"]): r for r in per_volume["results"]}
    assert sorted(rows) == sorted((k, m) for k in (2, 4) for m in ("nearest", "linear", "cubic"))
    assert rows[2, "linear"]["thick"] == thick_2
    for factor in (2, 4):
        linear, nearest = rows[factor, "linear"]["synthesized"], rows[factor, "nearest"]["synthesized"]
        assert linear["psnr_db"] > nearest["psnr_db"]
        assert linear["ssim_2d"] > nearest["ssim_2d"]
        assert linear["mae_hu"] < nearest["mae_hu"]
    # 30 slices: thick slices at 0, 2, ..., 28 cover 29 thin slices (x2); at 0, 4, ..., 28 they cover 29 (x4).
    assert rows[2, "linear"]["scored_slices"] == 29 and rows[2, "linear"]["synthesized_slices"] == 14
    assert rows[4, "linear"]["scored_slices"] == 29 and rows[4, "linear"]["synthesized_slices"] == 21

    title = printed.splitlines()[0]
    assert "HU window [-1024, 1000]" in title and "slab_average" in title
    assert sum(1 for line in printed.splitlines() if line.startswith(f"| {SMALL_VOLUME} |")) == 6
    assert (out / "baselines.md").read_text() in printed  # the table printed is the table written
    resolved = yaml.safe_load((out / "resolved-config.yaml").read_text())
    assert resolved["evaluation"]["hu_min"] == -1024.0 and resolved["data"]["thick"]["method"] == "slab_average"


def test_cli_subsample_linear_scores_match_a_hand_computation(tmp_path, demo_dir):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    shutil.copy(demo_dir / f"{SMALL_VOLUME}.nii.gz", dataset)
    assert _run_cli(tmp_path, "--set", f"data.source={dataset}", "--set", "data.thick.method=subsample",
                    "--factors", "2") == 0
    report = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert report["thick_method"]["method"] == "subsample" and report["factors"] == [2]
    row = next(r for r in report["volumes"][0]["results"] if r["method"] == "linear")
    volume = read_volume(dataset / f"{SMALL_VOLUME}.nii.gz")
    assert row["thick"] == simulate_thick(volume.array, 3.0, ThickConfig(method="subsample", factor=2)).describe()

    thin = volume.array.astype(np.float64)
    midpoints = (thin[0:27:2] + thin[2:29:2]) / 2  # linear between thick slices at 2j and 2j+2
    error = np.clip(midpoints, -1000, 1000) - np.clip(thin[1:28:2], -1000, 1000)
    assert row["synthesized"]["mae_hu"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert row["synthesized"]["psnr_db"] == pytest.approx(10 * math.log10(2000**2 / np.mean(error**2)), abs=1e-4)


def test_unknown_volume_id_is_refused_and_nothing_is_written(tmp_path, demo_dir, capsys):
    assert _run_cli(tmp_path, "--volumes", "nope") == 1
    assert re.search(r"no volume with id \['nope'\]; its volume ids are .*example_ct_sm", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_folder_is_refused_with_its_name(tmp_path, capsys):
    assert _run_cli(tmp_path, "--set", "data.source=/nonexistent/ct") == 1
    assert f"{PreparedDataError.__name__}: data.source '/nonexistent/ct': not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_perfect_rebuild_is_written_as_inf_not_dropped(tmp_path):
    # Constant along z: linear interpolation is exact, so PSNR is infinite (JSON has no Infinity).
    plane = np.random.default_rng(0).normal(0, 200, (12, 12)).astype(np.float32)
    thin = np.broadcast_to(plane, (13, 12, 12)).copy()
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=2))
    results = score_baselines(thin, thick, -1000, 1000, ["linear"])
    assert results[0].scores["synthesized"]["psnr_db"] == math.inf
    report = BaselineReport(dataset="flat", hu_range=[-1000, 1000], factors=[2], methods=["linear"],
                            thick_method={"method": "subsample", "thickness_mm": None, "summary": "subsample"},
                            volumes=[VolumeBaselines("flat", "flat.nii.gz", "0" * 64, [13, 12, 12], [1.0, 1.0, 1.0],
                                                     results)], mean_over_volumes=[])
    write_report(report, tmp_path)
    text = (tmp_path / "volumes" / "flat.json").read_text()
    assert json.loads(text)["results"][0]["synthesized"]["psnr_db"] == "inf"  # strict JSON: no Infinity token
    assert from_json(text)["results"][0]["synthesized"]["psnr_db"] == math.inf
    assert "| flat | x2 |" in format_table(report) and "| inf |" in format_table(report)


def test_table_columns_are_the_metric_tables_labels_printed_with_its_digits():
    thin = np.random.default_rng(1).normal(0, 200, (13, 12, 12)).astype(np.float32)
    thick = simulate_thick(thin, 1.0, ThickConfig(method="subsample", factor=2))
    results = score_baselines(thin, thick, -1000, 1000, ["nearest"])
    report = BaselineReport(dataset="noise", hu_range=[-1000, 1000], factors=[2], methods=["nearest"],
                            thick_method={"method": "subsample", "thickness_mm": None, "summary": "subsample"},
                            volumes=[VolumeBaselines("noise", "noise.nii.gz", "0" * 64, [13, 12, 12], [1.0, 1.0, 1.0],
                                                     results)], mean_over_volumes=[])
    lines = format_table(report).splitlines()
    header = [cell.strip() for cell in lines[2].strip("|").split("|")][4:]
    row = dict(zip(header, (cell.strip() for cell in lines[4].strip("|").split("|")[4:])))
    assert header == ["PSNR dB (all)", "PSNR dB (synth.)", "SSIM-3D (synth.)", "SSIM-2D (synth.)", "MAE HU (synth.)"]
    scores = results[0].scores
    for label, name, slice_set in (("PSNR dB (all)", "psnr_db", "all"), ("SSIM-2D (synth.)", "ssim_2d", "synthesized"),
                                   ("MAE HU (synth.)", "mae_hu", "synthesized")):
        metric = METRIC_BY_NAME[name]
        assert label.startswith(metric.label)
        assert row[label] == f"{scores[slice_set][name]:.{metric.digits}f}"
        assert len(row[label].split(".")[1]) == {"psnr_db": 2, "ssim_2d": 4, "mae_hu": 1}[name]


def test_bad_factors_are_refused(tmp_path, demo_dir):
    with pytest.raises(ValueError, match=r"factors must be integers >= 2, got \[1\]"):
        baseline_report(demo_dir, DataConfig(), factors=[1])
