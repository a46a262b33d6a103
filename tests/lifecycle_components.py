"""TEST-ONLY KFP component for tests/tracking/test_lifecycle.py: a step that opens its MLflow run and may fail.

The pipeline's real steps train for minutes; this one does what matters to the run lifecycle in a second: it
runs ctv2v.steps.context.tracked_step in its workspace folder, logs a metric, and raises if told to.
"""

from components.base import step_component


@step_component
def logging_step_op(config_json: str, workspace_root: str, pipeline_run_id: str, step: str, fail: bool):
    """Log `loss` = 1.0 in the nested MLflow run of `step`; raise RuntimeError after it if `fail`."""
    from ctv2v.steps.context import component_config, tracked_step, workspace_dir

    config = component_config(config_json)
    with tracked_step(config.tracking, workspace_dir(workspace_root, pipeline_run_id, step), step,
                      pipeline_run_id) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        if fail:
            raise RuntimeError(f"step {step} fails on purpose")
