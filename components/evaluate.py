"""Pipeline step `evaluate`: the trained model on the test split, next to the interpolation baselines.

Reads a prepared data folder (manifest.json, dataset/, preprocess-cache/) and a trained-model folder
(ctv2v.checkpointing); writes into OUT: report.json, report.html, predictions/<id>.nii.gz, panels/<id>.png and
the resolved config (see ctv2v.evaluate.evaluate). MLflow: a nested `evaluate` run with variant / phase / weights tags,
the test metrics of the model and of every baseline, the report and panels as artifacts, and the model
registered with its test PSNR (alias `candidate`; `champion` only if it beats the current champion).
"""

import argparse
import json
from pathlib import Path
from typing import Any

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import step_component
from ctv2v.config import RunConfig
from ctv2v.config_io import flatten, write_resolved

REPORT_HTML = "report.html"
REGISTERED_MODEL_PREFIX = "ctv2v-"
"""Registered model names are `ctv2v-<variant>`: each variant has its own champion."""


def metrics_for_mlflow(report: dict[str, Any]) -> dict[str, float]:
    """The report's mean test scores as flat MLflow metric names, e.g. `test/model/synthesized/psnr_db`."""
    return {f"test/{method}/{subset}/{name}": value
            for method, subsets in report["aggregate"].items()
            for subset, values in subsets.items()
            for name, value in values.items()}


def headline_psnr(report: dict[str, Any]) -> float:
    """The model's mean PSNR on synthesized test slices: the number a registered model is ranked by."""
    from ctv2v.evaluate.evaluate import MODEL

    return report["aggregate"][MODEL]["synthesized"]["psnr_db"]


def evaluate_step(
    config: RunConfig,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    pipeline_run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model in `model_dir` on the test split of `data_dir`; returns the report."""
    import torch

    from ctv2v.models.artifacts import load_trained_model
    from ctv2v.evaluate.compare import to_html
    from ctv2v.data.cache import PreprocessCache
    from ctv2v.data.manifest import load_manifest
    from ctv2v.data.prepared import DATASET_DIR, MANIFEST_FILE, PREPROCESS_CACHE_DIR
    from ctv2v.train.device import select_device
    from ctv2v.evaluate.evaluate import PANELS_DIR, REPORT_FILE, evaluate, weights_kind
    from ctv2v.files import atomic_write_text
    from ctv2v.tracking.runs import Tracker, new_pipeline_run_id

    data_dir, model_dir, out_dir = Path(data_dir), Path(model_dir), Path(out_dir)
    device = select_device(config.device)
    manifest_path = data_dir / MANIFEST_FILE
    manifest = load_manifest(manifest_path)
    model = load_trained_model(model_dir, config).to(device)
    weights_label = model.vae.weights_label
    if weights_label is None:
        raise ValueError(f"{model_dir}: the trained model's VAE carries no weights label")
    write_resolved(config, out_dir)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    tracker = Tracker(config.tracking, out_dir)
    with tracker.step_run("evaluate", pipeline_run_id or new_pipeline_run_id(), variant=config.variant,
                          phase="evaluate", weights=weights_kind(weights_label)):
        tracker.log_params(flatten(config))
        tracker.log_input_manifest(manifest_path, context="evaluation")
        report = evaluate(model, manifest, PreprocessCache(data_dir / PREPROCESS_CACHE_DIR), data_dir / DATASET_DIR,
                          config, out_dir, generator, weights_label=weights_label)
        atomic_write_text(out_dir / REPORT_HTML, to_html({config.variant: report}))
        tracker.log_metrics(metrics_for_mlflow(report), step=0)
        tracker.log_artifact(out_dir / REPORT_FILE, "evaluation")
        tracker.log_artifact(out_dir / REPORT_HTML, "evaluation")
        tracker.log_artifacts(out_dir / PANELS_DIR, "evaluation/panels")
        if config.tracking.register_model:
            tracker.register_model(model_dir, f"{REGISTERED_MODEL_PREFIX}{config.variant}",
                                   test_psnr=headline_psnr(report))
    return report


# ---------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("evaluate", help="score the trained model and the baselines on the test split")
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--model", required=True, type=Path, help="trained-model folder (holds model.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (report, predictions, panels)")
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")
    parser.set_defaults(func=_evaluate_command)


def _evaluate_command(args: argparse.Namespace) -> int:
    from ctv2v.evaluate.evaluate import REPORT_FILE
    from ctv2v.config_io import config_from_args

    report = evaluate_step(config_from_args(args), args.data, args.model, args.out, args.pipeline_run_id)
    summary = {"variant": report["variant"], "weights": report["weights_display"], "hu_range": report["hu_range"],
               "volumes": report["n_volumes"], "sample_steps": report["sample_steps"],
               "mean": {method: scores["synthesized"] for method, scores in report["aggregate"].items()},
               "report": str(Path(args.out) / REPORT_FILE)}
    if report["weights"] == "stand-in":
        summary["warning"] = report["warning"]
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------- KFP
@step_component
def evaluate_op(
    config_yaml: str,
    variant: str,
    pipeline_run_id: str,
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Artifact],
    report_html: Output[HTML],
):
    """Evaluate the train step's final `variant` model; `report` receives the evaluation folder, `metrics` its means.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder.
    """
    import shutil
    from pathlib import Path

    from components.evaluate import REPORT_HTML, evaluate_step, headline_psnr
    from ctv2v.config_io import config_from_text

    if "data_dir" not in data.metadata:
        raise ValueError(f"data artifact {data.uri}: metadata has no 'data_dir' (expected prepare-data's manifest)")
    config = config_from_text(config_yaml, "config_yaml")
    config.variant = variant
    # The train step's output folder holds the final trained model in model/ (best-by-val-loss in best-model/).
    result = evaluate_step(config, Path(data.metadata["data_dir"]), Path(model.path) / "model", Path(report.path),
                           pipeline_run_id)
    metrics.log_metric("test_psnr_db_synthesized", headline_psnr(result))
    for method, subsets in result["aggregate"].items():
        for subset, values in subsets.items():
            for name in ("psnr_db", "ssim_3d", "mae_hu"):
                metrics.log_metric(f"{method}_{subset}_{name}", values[name])
    report.metadata.update({"variant": result["variant"], "weights": result["weights_display"],
                            "hu_range": result["hu_range"], "sample_steps": result["sample_steps"]})
    shutil.copyfile(Path(report.path) / REPORT_HTML, report_html.path)
