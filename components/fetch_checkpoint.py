"""KFP component of the `fetch-checkpoint` step (ctv2v.steps.fetch_checkpoint)."""

from kfp.dsl import Model, Output

from components.base import step_component


@step_component
def fetch_checkpoint_op(fetch_config: str, checkpoint: Output[Model]):
    """Fetch MAISI's VAE checkpoint (or build a stand-in); `checkpoint` receives the file and fetch-record.json.

    `fetch_config` holds only the config keys that decide the result (ctv2v.steps.pipeline_inputs.FETCH_KEYS): the
    step is cached on them.
    """
    from pathlib import Path

    from ctv2v.steps.context import component_config, freeze_for_exit
    from ctv2v.steps.fetch_checkpoint import fetch_checkpoint_step

    record = fetch_checkpoint_step(component_config(fetch_config), Path(checkpoint.path)).record
    checkpoint.metadata.update({"source": record.source, "sha256": record.sha256, "size": record.size,
                                "weights": record.weights})
    freeze_for_exit()
