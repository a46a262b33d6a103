"""Step `evaluate`: the trained model on the test split, next to the interpolation baselines.

Reads a prepared data folder (manifest.json, dataset/, preprocess-cache/) and a trained-model folder
(ctv2v.models.artifacts); writes into OUT: report.json, report.html, predictions/<id>.nii.gz, panels/<id>.png
and the resolved config (see ctv2v.evaluate.evaluate). MLflow: a nested `evaluate` run with variant / phase /
weights tags, the test metrics of the model and of every baseline, the report, panels and predicted NIfTI volumes
as artifacts, and the model logged as an MLflow pyfunc model (ctv2v.tracking.pyfunc), registered as a version of
`ctv2v-<variant>` tagged with its facts (alias `candidate`; `champion` only by the rules of ctv2v.tracking.registry).
Sampling runs under fp16 autocast on CUDA and in fp32 on CPU (training.precision, ctv2v.device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved
from ctv2v.data.cache import PreprocessCache
from ctv2v.data.manifest import load_manifest
from ctv2v.data.prepared import DATASET_DIR, MANIFEST_FILE, PREPROCESS_CACHE_DIR
from ctv2v.device import resolve_precision, select_device
from ctv2v.evaluate.compare import to_html
from ctv2v.evaluate.evaluate import (
    MODEL,
    PANELS_DIR,
    PREDICTIONS_DIR,
    REPORT_FILE,
    EvaluationReport,
    evaluate,
)
from ctv2v.evaluate.metrics import HEADLINE
from ctv2v.files import atomic_write_text
from ctv2v.models.artifacts import load_model_for_inference, read_model_meta
from ctv2v.models.weights import weights_kind
from ctv2v.provenance import git_commit
from ctv2v.steps.context import tracked_step
from ctv2v.tracking.registry import VersionFacts, sha256_json

REPORT_HTML = "report.html"
OUTPUT_FILES = (REPORT_FILE, REPORT_HTML, PANELS_DIR, "resolved-config.yaml")
OPTIONAL_OUTPUT_FILES = (PREDICTIONS_DIR,)
"""What the step writes into OUT and its KFP component exports into the `report` artifact (predicted volumes only
with evaluation.write_nifti); MLflow's pending journal and run file stay in OUT."""
REGISTERED_MODEL_PREFIX = "ctv2v-"
"""Registered model names are `ctv2v-<variant>`: each variant has its own champion."""


@dataclass(frozen=True)
class Evaluation:
    """An evaluation step's result: the report (also in `report_file`) and its headline."""

    report: EvaluationReport
    report_file: Path

    @property
    def headline_psnr(self) -> float:
        """The model's mean PSNR on synthesized test slices: the number a registered model is ranked by."""
        metric, subset = HEADLINE
        return self.report.aggregate[MODEL][subset][metric]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready headline: whose model, which window, each method's mean scores on synthesized slices."""
        report = self.report
        data: dict[str, Any] = {
            "variant": report.variant, "weights": report.weights_display, "hu_range": report.hu_range,
            "volumes": report.n_volumes, "sample_steps": report.sample_steps,
            "mean": {method: scores["synthesized"] for method, scores in report.aggregate.items()},
            "report": str(self.report_file)}
        if report.warning is not None:
            data["warning"] = report.warning
        return data


def metrics_for_mlflow(aggregate: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Mean test scores as flat MLflow metric names, e.g. `test/model/synthesized/psnr_db`; MLflow refuses `+` in
    a name, so the data-consistent baselines are spelled `test/cubic_dc/...` (`cubic+dc` in the reports)."""
    return {f"test/{method.replace('+', '_')}/{subset}/{name}": value
            for method, subsets in aggregate.items()
            for subset, values in subsets.items()
            for name, value in values.items()}


def evaluate_step(
    config: RunConfig,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    pipeline_run_id: str | None = None,
) -> Evaluation:
    """Evaluate the trained model in `model_dir` on the test split of `data_dir`."""
    data_dir, model_dir, out_dir = Path(data_dir), Path(model_dir), Path(out_dir)
    device = select_device(config.device)
    manifest_path = data_dir / MANIFEST_FILE
    manifest = load_manifest(manifest_path)
    model = load_model_for_inference(model_dir, config, device)
    weights_label = model.vae.weights_label
    if weights_label is None:
        raise ValueError(f"{model_dir}: the trained model's VAE carries no weights label")
    generator = torch.Generator(device=device).manual_seed(config.seed)

    precision = resolve_precision(config.training.precision, device)
    with tracked_step(config.tracking, out_dir, "evaluate", pipeline_run_id, variant=config.variant,
                      phase="evaluate", weights=weights_kind(weights_label)) as tracker:
        tracker.log_params(flatten(config))
        tracker.log_input_manifest(manifest_path, context="evaluation")
        # The dataset link resolved: errors name the user's files, not <data_dir>/dataset/...
        with precision.autocast(device):
            report = evaluate(model, manifest, PreprocessCache(data_dir / PREPROCESS_CACHE_DIR),
                              (data_dir / DATASET_DIR).resolve(), config, out_dir, generator,
                              weights_label=weights_label)
        evaluation = Evaluation(report, out_dir / REPORT_FILE)
        atomic_write_text(out_dir / REPORT_HTML, to_html({config.variant: report}))
        tracker.log_metrics(metrics_for_mlflow(report.aggregate), step=0)
        tracker.log_artifact(out_dir / REPORT_FILE, "evaluation")
        tracker.log_artifact(out_dir / REPORT_HTML, "evaluation")
        tracker.log_artifacts(out_dir / PANELS_DIR, "evaluation/panels")
        # Every predicted test volume (evaluation.max_volumes bounds how many), so a run shows what it scored.
        tracker.log_artifacts(out_dir / PREDICTIONS_DIR, "evaluation/predictions")
        if config.tracking.register_model:
            tracker.register_model(model_dir, f"{REGISTERED_MODEL_PREFIX}{config.variant}",
                                   version_facts(evaluation, model_dir, config))
    write_resolved(config, out_dir)  # last: a step that fails leaves no config posing as output
    return evaluation


def version_facts(evaluation: Evaluation, model_dir: Path, config: RunConfig) -> VersionFacts:
    """The registry tags of an evaluated model: what it is, what it was scored on, and its score.

    The evaluation hash covers what defines the test set and the metric (manifest, scored volumes, thick
    series, HU window), not the model's own inference settings (sampling steps, seed), which a better model
    may change.
    """
    report = evaluation.report
    test_set = {"manifest_sha256": report.manifest_sha256, "volume_ids": report.volume_ids,
                "thick": report.thick, "hu_range": report.hu_range}
    return VersionFacts(
        weights=report.weights, smoke=config.tracking.smoke_run, manifest_sha256=report.manifest_sha256,
        evaluation_sha256=sha256_json(test_set), config_sha256=sha256_json(read_model_meta(model_dir)["config"]),
        git_commit=git_commit(), test_psnr=evaluation.headline_psnr,
    )
