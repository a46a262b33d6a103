"""KFP component of the `prepare-data` step (ctv2v.steps.prepare_data)."""

from kfp.dsl import Dataset, Output

from components.base import step_component


@step_component
def prepare_data_op(config_json: str, workspace_root: str, pipeline_run_id: str, manifest: Output[Dataset]):
    """Prepare <workspace_root>/runs/<run id>/data; `manifest` gets manifest.json, its metadata the folder."""
    import shutil

    from ctv2v.data.prepared import MANIFEST_FILE
    from ctv2v.steps.context import component_config, workspace_dir
    from ctv2v.steps.prepare_data import prepare_data_step

    prepared = prepare_data_step(component_config(config_json),
                                 workspace_dir(workspace_root, pipeline_run_id, "data"))
    shutil.copyfile(prepared.data_dir / MANIFEST_FILE, manifest.path)
    manifest.metadata.update({"data_dir": str(prepared.data_dir), **prepared.splits})
