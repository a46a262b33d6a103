"""KFP component of the `match-architecture` step (ctv2v.steps.match_architecture)."""

from kfp.dsl import Input, Metrics, Model, Output

from components.base import step_component


@step_component
def match_architecture_op(match_config: str, data_sha256: str, workspace_root: str, checkpoint: Input[Model],
                          vae: Output[Model], metrics: Output[Metrics], pipeline_run_id: str = ""):
    """Load MAISI's VAE checkpoint strictly; `vae` receives the VAE artifact, `metrics` the match and PSNR.

    The step is cached on its inputs: `match_config` holds only the config keys that decide the result
    (ctv2v.steps.pipeline_inputs.MATCH_KEYS), `data_sha256` the prepared data's manifest hash, `checkpoint` is
    fetch-checkpoint's (cached) artifact. The run id, which names the prepared data folder on the workspace and
    the MLflow parent run, is no input on a cluster (ctv2v.steps.pipeline_inputs.cached_step_run_id).
    """
    import json
    from pathlib import Path

    from ctv2v.data.prepared import MANIFEST_FILE
    from ctv2v.files import sha256_file
    from ctv2v.steps.context import component_config, export_files, freeze_for_exit, workspace_dir
    from ctv2v.steps.match_architecture import OUTPUT_FILES, match_architecture_step
    from ctv2v.steps.pipeline_inputs import cached_step_run_id

    run_id = cached_step_run_id(pipeline_run_id)
    data_dir = workspace_dir(workspace_root, run_id, "data")
    found = sha256_file(data_dir / MANIFEST_FILE)
    if found != data_sha256:
        raise ValueError(f"{data_dir / MANIFEST_FILE}: sha256 {found}, but prepare-data reported {data_sha256}: "
                         "the prepared data changed under this run")
    # Works in the run's workspace folder, where finish-run finds its MLflow journal (export_files says why).
    out_dir = workspace_dir(workspace_root, run_id, "vae-pretrained")
    summary = match_architecture_step(component_config(match_config, "pretrained"), Path(checkpoint.path),
                                      out_dir, data_dir, run_id)
    export_files(out_dir, vae.path, OUTPUT_FILES)
    metrics.log_metric("maisi_tensors_loaded_fraction", summary.match.loaded_fraction)
    metrics.log_metric("latent_scale", summary.latent_scale)
    if summary.recon_check.psnr_db is not None:
        metrics.log_metric("recon_psnr_db", summary.recon_check.psnr_db)
    # The values also as a file: kfp.local's cache takes an output artifact without a file for a deleted one,
    # and would never reuse this step.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2) + "\n")
    vae.metadata.update({"weights": summary.weights, "load": summary.load,
                         "loaded": f"{summary.match.loaded}/{summary.match.total}",
                         "recon_check": summary.recon_check.status})
    freeze_for_exit()
