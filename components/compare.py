"""KFP component of the `compare` step (ctv2v.steps.compare)."""

from kfp.dsl import HTML, Artifact, Input, Markdown, Output

from components.base import step_component


@step_component
def compare_op(
    config_json: str,
    pipeline_run_id: str,
    main_report: Input[Artifact],
    pretrained_report: Input[Artifact],
    comparison: Output[Artifact],
    markdown: Output[Markdown],
    html: Output[HTML],
):
    """Compare the two variants' evaluation folders; the tables go to the Markdown and HTML outputs."""
    from pathlib import Path

    from ctv2v.steps.compare import compare_step
    from ctv2v.steps.context import component_config, freeze_for_exit

    result = compare_step({"main": Path(main_report.path), "pretrained": Path(pretrained_report.path)},
                          Path(comparison.path), component_config(config_json).tracking, pipeline_run_id)
    Path(markdown.path).write_text(result.markdown)
    Path(html.path).write_text(result.html)
    freeze_for_exit()
