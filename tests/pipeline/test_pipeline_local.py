"""End to end: the DAG under kfp.local on the demo CT data, both branches, against real MLflow and S3 servers; and
kfp.local's task cache reusing the pretrained VAE's steps in a second run."""

import json
import logging
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Model
from mlflow.tracking import MlflowClient

from ctv2v.config import ClusterConfig
from ctv2v.config_io import load_config
from ctv2v.steps.pipeline_inputs import run_parameter_defaults
from pipeline.cli import main as cli_main
from pipeline.backend import backend_plan
from pipeline.dag import Build, config_argument, pretrained_vae, resolve_and_prepare
from pipeline.local import init_local

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CHEAPER_THAN_SMOKE = [
    "data.clip.clips_per_volume=1",
    "training.val_clips=1", "training.val_sample_steps=1",
    "evaluation.sample_steps=1", "evaluation.tile_height=64", "evaluation.tile_width=64",
]
"""smoke.yaml's one epoch per phase with one clip per volume, one validation clip sampled in one step, and the test
volume cut into 18 tiles of 16 x 64 x 64 sampled in one step (smoke's 32 x 32 crop made 60 tiles of 4 steps): every
step of both branches still runs end to end, in less time on a busy machine."""


@pytest.mark.slow
def test_run_local_runs_both_branches_to_the_compare_table(mlflow_server, demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(tmp_path)
    # The cluster's workspace mount: a local run must not write there (nor anywhere else outside --out).
    cluster_workspace = Path(ClusterConfig().workspace_mount) / "runs"
    before = sorted(cluster_workspace.iterdir()) if cluster_workspace.is_dir() else None
    cheaper = [arg for override in CHEAPER_THAN_SMOKE for arg in ("--set", override)]
    code = cli_main(["pipeline", "run-local", "--config", str(CONFIGS / "smoke.yaml"), "--weights", "stand-in",
                     "--set", "tracking.experiment=ctv2v-e2e", *cheaper, "--out", str(tmp_path / "run")])
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "the run wrote next to --out"
    after = sorted(cluster_workspace.iterdir()) if cluster_workspace.is_dir() else None
    assert after == before, f"the local run wrote into {cluster_workspace}"
    [run_folder] = (tmp_path / "run" / "workspace" / "runs").iterdir()
    assert any(run_folder.iterdir()), "the steps work under --out/workspace"
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.rindex("{\n"):])
    table = Path(result["compare_markdown"]).read_text()
    assert table in printed
    assert "stand-in" in table and "main" in table and "pretrained" in table
    assert "HU [-1000, 1000]" in table or "[-1000, 1000]" in table
    for baseline in ("linear", "nearest", "cubic"):
        assert baseline in table

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("ctv2v-e2e")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags) for r in runs]
    assert parents[0].info.status == "FINISHED"  # ended by the exit handler, finish-run
    assert {r.data.tags["mlflow.parentRunId"] for r in steps} == {parents[0].info.run_id}
    steps_by_variant = {}
    for run in steps:
        steps_by_variant.setdefault(run.data.tags.get("ctv2v.variant"), set()).add(run.data.tags["ctv2v.step"])
    assert steps_by_variant["main"] == {"train-vae", "train-frozen", "train-full", "evaluate"}
    assert steps_by_variant["pretrained"] == {"match-architecture", "train-frozen", "train-full", "evaluate"}
    pretrained_steps = [r for r in steps if r.data.tags.get("ctv2v.variant") == "pretrained"]
    assert all(r.data.tags["ctv2v.weights"] == "stand-in" for r in pretrained_steps)
    assert all(r.data.tags["ctv2v.weights"] == "scratch" for r in steps if r.data.tags.get("ctv2v.variant") == "main")
    evaluations = [r for r in steps if r.data.tags["ctv2v.step"] == "evaluate"]
    for run in evaluations:
        assert any(key.startswith("test/linear/") for key in run.data.metrics)
        assert any(key.startswith("test/model/") for key in run.data.metrics)
    for variant in ("main", "pretrained"):
        version = client.get_model_version_by_alias(f"ctv2v-{variant}", "candidate")
        assert version.version


def _pretrained_vae_pipeline(config, given: dict):
    """A pipeline of the DAG's own pieces up to the pretrained VAE: resolve-config, prepare-data, fetch-checkpoint,
    match-architecture, built for kfp.local as run-local builds it, with the run parameters `given`."""
    build = Build(config.cluster, backend_plan(config.cluster), "test-commit", local=True)
    compiled = run_parameter_defaults(config, with_scratch_vae=True)
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    @dsl.pipeline(name="ctv2v-pretrained-vae")
    def pretrained_vae_pipeline(config_text: str, workspace_root: str) -> Model:
        resolved, prepared = resolve_and_prepare(build, config_text, workspace_root, run_id, compiled, given)
        return pretrained_vae(build, resolved, prepared, run_id, workspace_root).outputs["vae"]

    return pretrained_vae_pipeline


@pytest.mark.slow
def test_a_second_run_reuses_fetch_and_match_when_only_training_settings_change(demo_dir, tmp_path, monkeypatch,
                                                                              caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config([CONFIGS / "pretrained.yaml", CONFIGS / "smoke.yaml"], ["vae.maisi.weights=stand-in"])
    outputs = init_local(tmp_path)
    arguments = {"config_text": config_argument(config), "workspace_root": str(tmp_path / "workspace")}
    caplog.set_level(logging.INFO)
    first = _pretrained_vae_pipeline(config, {})(**arguments)
    assert "cache hit" not in caplog.text
    caplog.clear()
    # Another run id, other training lengths and learning rates: nothing the VAE depends on.
    second = _pretrained_vae_pipeline(config, {"frozen_epochs": 3, "full_lr": 1e-5, "sample_steps": 2})(**arguments)
    assert "Task fetch-checkpoint-op cache hit" in caplog.text
    assert "Task match-architecture-op cache hit" in caplog.text
    assert second.output.uri == first.output.uri, "the second run made a VAE of its own"
    [first_run, second_run] = sorted(outputs.glob("ctv2v-pretrained-vae-*"))
    assert (first_run / "match-architecture-op").is_dir() and not (second_run / "match-architecture-op").exists()
    assert (second_run / "prepare-data-op").is_dir(), "prepare-data is never cached: it fills the run's folder"
    assert len(list((tmp_path / "workspace" / "runs").iterdir())) == 2
