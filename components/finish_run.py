"""KFP component of the `finish-run` exit-handler step (ctv2v.steps.finish_run)."""

from kfp import dsl

from components.base import step_component


@step_component
def finish_run_op(config_json: str, workspace_root: str, pipeline_run_id: str, scratch_cleanup: str,
                  status: dsl.PipelineTaskFinalStatus):
    """Upload the run's pending MLflow journals, end its parent MLflow run by the pipeline's final `status`, then
    remove the run's workspace folder as `scratch_cleanup` says (never, on_success, always)."""
    import json
    import logging

    from ctv2v.data.prepared import run_workspace
    from ctv2v.steps.context import component_config, freeze_for_exit
    from ctv2v.steps.finish_run import finish_run_step

    tracking = component_config(config_json).tracking
    finished = finish_run_step(tracking, run_workspace(workspace_root, pipeline_run_id), pipeline_run_id,
                               status.state, scratch_cleanup)
    logging.getLogger("finish-run").info("%s", json.dumps(finished.to_dict(), indent=2))
    freeze_for_exit()
