"""KFP component of the `train` step, both phases (ctv2v.steps.train)."""

from typing import Optional

from kfp.dsl import Dataset, Input, Model, Output

from components.base import step_component


@step_component
def train_op(
    config_json: str,
    variant: str,
    phase: str,
    workspace_root: str,
    pipeline_run_id: str,
    data: Input[Dataset],
    vae: Input[Model],
    model: Output[Model],
    gpus: int,
    init: Optional[Input[Model]] = None,
):
    """Train one phase of `variant`; checkpoints stay on the workspace volume, `model` receives model/ and best-model/.

    `data` is prepare-data's manifest artifact (metadata `data_dir`); `init` is the frozen phase's `model`.
    `gpus` is compiled into the pipeline next to the pod's GPU limit; it replaces cluster.gpus_per_step of the
    runtime config, so that the processes started always match the GPUs the pod got.
    """
    from pathlib import Path

    from ctv2v.steps.context import (component_config, export_files, freeze_for_exit, prepared_data_dir, run_on_gpus,
                                     workspace_dir)
    from ctv2v.steps.train import BEST_MODEL_DIR, MODEL_DIR, train_step

    data_dir = prepared_data_dir(data.metadata, data.uri)
    config = component_config(config_json, variant, gpus_per_step=gpus)
    out_dir = workspace_dir(workspace_root, pipeline_run_id, f"train-{phase}-{variant}")
    run_on_gpus(train_step, gpus, config, out_dir, phase=phase, data_dir=data_dir,
                vae_dir=Path(vae.path), init_dir=None if init is None else Path(init.path), resume=True,
                pipeline_run_id=pipeline_run_id)
    # No best-model/ when validation never ran; the checkpoints stay on the workspace.
    export_files(out_dir, model.path, (MODEL_DIR,), optional=(BEST_MODEL_DIR,))
    model.metadata.update({"phase": phase, "variant": variant, "workspace_dir": str(out_dir)})
    freeze_for_exit()
