"""KFP component of the `train-vae` step (ctv2v.steps.train_vae)."""

from kfp.dsl import Dataset, Input, Model, Output

from components.base import step_component


@step_component
def train_vae_op(config_json: str, workspace_root: str, pipeline_run_id: str, data: Input[Dataset],
                 vae: Output[Model], gpus: int):
    """Train the scratch VAE on the workspace volume (retries resume there); `vae` receives the VAE artifact.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder. `gpus` is
    compiled into the pipeline next to the pod's GPU limit and replaces cluster.gpus_per_step of the runtime config.
    """
    from ctv2v.models.vae import read_vae_meta
    from ctv2v.steps.context import (component_config, export_files, freeze_for_exit, prepared_data_dir, run_on_gpus,
                                     workspace_dir)
    from ctv2v.steps.train_vae import VAE_FILES, train_vae_step

    data_dir = prepared_data_dir(data.metadata, data.uri)
    config = component_config(config_json, "main", gpus_per_step=gpus)
    out_dir = workspace_dir(workspace_root, pipeline_run_id, "train-vae-main")
    run_on_gpus(train_vae_step, gpus, config, out_dir, data_dir=data_dir, resume=True,
                pipeline_run_id=pipeline_run_id)
    export_files(out_dir, vae.path, VAE_FILES)
    written = read_vae_meta(out_dir)
    vae.metadata.update({"weights": written.weights, "latent_scale": written.latent_scale,
                         "workspace_dir": str(out_dir)})
    freeze_for_exit()
