"""KFP component of the `prepare-data` step (ctv2v.steps.prepare_data)."""

from typing import NamedTuple

from kfp.dsl import Dataset, Output

from components.base import step_component


@step_component
def prepare_data_op(config_json: str, workspace_root: str, pipeline_run_id: str,
                    manifest: Output[Dataset]) -> NamedTuple("Outputs", [("manifest_sha256", str)]):
    """Prepare <workspace_root>/runs/<run id>/data; `manifest` gets manifest.json, its metadata the folder.

    `manifest_sha256` names the prepared data by content (volume hashes, splits, thick series) for the cache
    key of match-architecture, whose inputs must not hold this run's folder.
    """
    import shutil
    from collections import namedtuple

    from ctv2v.data.prepared import MANIFEST_FILE
    from ctv2v.files import sha256_file
    from ctv2v.steps.context import component_config, freeze_for_exit, workspace_dir
    from ctv2v.steps.prepare_data import prepare_data_step

    prepared = prepare_data_step(component_config(config_json),
                                 workspace_dir(workspace_root, pipeline_run_id, "data"))
    shutil.copyfile(prepared.data_dir / MANIFEST_FILE, manifest.path)
    manifest.metadata.update({"data_dir": str(prepared.data_dir), **prepared.splits})
    freeze_for_exit()
    return namedtuple("Outputs", ["manifest_sha256"])(sha256_file(prepared.data_dir / MANIFEST_FILE))
