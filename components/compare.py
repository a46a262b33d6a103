"""KFP component of the `compare` step (ctv2v.steps.compare)."""

from kfp.dsl import HTML, Artifact, Input, Markdown, Output

from components.base import step_component


@step_component
def compare_op(
    config_json: str,
    workspace_root: str,
    pipeline_run_id: str,
    main_report: Input[Artifact],
    pretrained_report: Input[Artifact],
    comparison: Output[Artifact],
    markdown: Output[Markdown],
    html: Output[HTML],
):
    """Compare the two variants' evaluation folders; the tables go to the Markdown and HTML outputs.

    The step works in the run's workspace folder, where finish-run finds its MLflow journal
    (ctv2v.steps.context.export_files), and exports the tables into `comparison`.
    """
    from pathlib import Path

    from ctv2v.steps.compare import OUTPUT_FILES, compare_step
    from ctv2v.steps.context import component_config, export_files, freeze_for_exit, workspace_dir

    out_dir = workspace_dir(workspace_root, pipeline_run_id, "compare")
    result = compare_step({"main": Path(main_report.path), "pretrained": Path(pretrained_report.path)},
                          out_dir, component_config(config_json).tracking, pipeline_run_id)
    export_files(out_dir, comparison.path, OUTPUT_FILES)
    Path(markdown.path).write_text(result.markdown)
    Path(html.path).write_text(result.html)
    freeze_for_exit()
