"""KFP component of the `evaluate` step (ctv2v.steps.evaluate)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import step_component


@step_component
def evaluate_op(
    config_json: str,
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

    from ctv2v.steps.context import component_config, freeze_for_exit, prepared_data_dir
    from ctv2v.steps.evaluate import REPORT_HTML, evaluate_step
    from ctv2v.steps.train import MODEL_DIR

    data_dir = prepared_data_dir(data.metadata, data.uri)
    # The train step's artifact holds the final trained model in model/ (best-by-val-loss in best-model/).
    evaluation = evaluate_step(component_config(config_json, variant), data_dir, Path(model.path) / MODEL_DIR,
                               Path(report.path), pipeline_run_id)
    metrics.log_metric("test_psnr_db_synthesized", evaluation.headline_psnr)
    for method, subsets in evaluation.report.aggregate.items():
        for subset, values in subsets.items():
            for name in ("psnr_db", "ssim_3d", "mae_hu"):
                metrics.log_metric(f"{method}_{subset}_{name}", values[name])
    report.metadata.update({"variant": evaluation.report.variant, "weights": evaluation.report.weights_display,
                            "hu_range": evaluation.report.hu_range, "sample_steps": evaluation.report.sample_steps})
    shutil.copyfile(Path(report.path) / REPORT_HTML, report_html.path)
    freeze_for_exit()
