"""KFP component of the `evaluate` step (ctv2v.steps.evaluate)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.base import step_component


@step_component
def evaluate_op(
    config_json: str,
    variant: str,
    workspace_root: str,
    pipeline_run_id: str,
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Artifact],
    report_html: Output[HTML],
):
    """Evaluate the train step's final `variant` model; `report` receives the evaluation folder, `metrics` its means.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder. The step
    works in the run's workspace folder, where finish-run finds its MLflow journal (ctv2v.steps.context.export_files).
    """
    import shutil
    from pathlib import Path

    from ctv2v.evaluate.metrics import HEADLINE, METRIC_NAMES
    from ctv2v.steps.context import (component_config, export_files, freeze_for_exit, prepared_data_dir,
                                     workspace_dir)
    from ctv2v.steps.evaluate import OPTIONAL_OUTPUT_FILES, OUTPUT_FILES, REPORT_HTML, evaluate_step
    from ctv2v.steps.train import MODEL_DIR

    data_dir = prepared_data_dir(data.metadata, data.uri)
    out_dir = workspace_dir(workspace_root, pipeline_run_id, f"evaluate-{variant}")
    # The final trained model, model/ of the train step's folder on the workspace volume (metadata `workspace_dir`):
    # the files train_op exported into the `model` artifact, at a path every pod of the run reads, so a model
    # registration left pending in this step's journal names files finish-run can upload (the artifact's path is
    # local to this pod).
    if "workspace_dir" not in model.metadata:
        raise ValueError(f"model artifact {model.uri}: metadata has no 'workspace_dir' (expected train's model)")
    evaluation = evaluate_step(component_config(config_json, variant), data_dir,
                               Path(model.metadata["workspace_dir"]) / MODEL_DIR, out_dir, pipeline_run_id)
    export_files(out_dir, report.path, OUTPUT_FILES, optional=OPTIONAL_OUTPUT_FILES)
    metrics.log_metric("test_{}_{}".format(*HEADLINE), evaluation.headline_psnr)
    for method, subsets in evaluation.report.aggregate.items():
        for subset, values in subsets.items():
            for name in METRIC_NAMES:
                metrics.log_metric(f"{method}_{subset}_{name}", values[name])
    report.metadata.update({"variant": evaluation.report.variant, "weights": evaluation.report.weights_display,
                            "hu_range": evaluation.report.hu_range, "sample_steps": evaluation.report.sample_steps})
    shutil.copyfile(out_dir / REPORT_HTML, report_html.path)
    freeze_for_exit()
