"""KFP component of the `match-architecture` step (ctv2v.steps.match_architecture)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.base import step_component


@step_component
def match_architecture_op(config_json: str, pipeline_run_id: str, data: Input[Dataset], checkpoint: Input[Model],
                          vae: Output[Model], metrics: Output[Metrics]):
    """Load MAISI's VAE checkpoint strictly; `vae` receives the VAE artifact, `metrics` the match and PSNR.

    `data` is prepare-data's manifest artifact; its metadata `data_dir` names the prepared data folder.
    """
    from pathlib import Path

    from ctv2v.steps.context import component_config, prepared_data_dir
    from ctv2v.steps.match_architecture import match_architecture_step

    data_dir = prepared_data_dir(data.metadata, data.uri)
    summary = match_architecture_step(component_config(config_json, "pretrained"), Path(checkpoint.path),
                                      Path(vae.path), data_dir, pipeline_run_id)
    metrics.log_metric("maisi_tensors_loaded_fraction", summary.match.loaded_fraction)
    metrics.log_metric("latent_scale", summary.latent_scale)
    if summary.recon_check.psnr_db is not None:
        metrics.log_metric("recon_psnr_db", summary.recon_check.psnr_db)
    vae.metadata.update({"weights": summary.weights, "load": summary.load,
                         "loaded": f"{summary.match.loaded}/{summary.match.total}",
                         "recon_check": summary.recon_check.status})
