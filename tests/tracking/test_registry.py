"""The model registry against a real MLflow server: a loadable pyfunc model, version tags, champion rules."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.models import validate_serving_input
from packaging.requirements import Requirement
from packaging.version import Version

from ctv2v.config import TrackingConfig
from ctv2v.data.readers import read_volume
from ctv2v.tracking.hierarchy import new_pipeline_run_id
from ctv2v.tracking.registry import CHAMPION_ALIAS, VersionFacts, register_version
from ctv2v.tracking.runs import Tracker
from ctv2v.tracking.tags import (
    TAG_CONFIG_SHA256,
    TAG_EVALUATION_SHA256,
    TAG_GIT_COMMIT,
    TAG_MANIFEST_SHA256,
    TAG_SMOKE,
    TAG_TEST_PSNR,
    TAG_WEIGHTS,
)
from pipeline.cli import main as cli_main
from tests.conftest import EVALUATION_OVERRIDES, evaluation_config, prepared_phantoms
from tests.tiny_model import FACTS, small_demo_series, tiny_model


@pytest.fixture(autouse=True)
def restore_mlflow_http_env(monkeypatch):
    """Trackers set MLflow's HTTP timeout and retries process-wide; monkeypatch restores them after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


def tracking(uri: str) -> TrackingConfig:
    return TrackingConfig(tracking_uri=uri, experiment=f"test-{uuid.uuid4().hex[:8]}", request_timeout_s=10,
                          max_retries=1, system_metrics_interval_s=None)


def test_registered_pyfunc_model_predicts_like_ctv2v_predict(mlflow_server, demo_dir, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    model_dir = tiny_model(tmp_path / "model")
    name = f"ctv2v-test-{uuid.uuid4().hex[:6]}"
    tracker = Tracker(tracking(mlflow_server.uri), tmp_path / "eval")
    with tracker.step_run("evaluate", new_pipeline_run_id(), variant="main"):
        registration = tracker.register_model(model_dir, name, FACTS)
    assert registration.champion and registration.refusal is None

    series = small_demo_series(demo_dir, tmp_path / "thick-dicom")
    thick = read_volume(series)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    assert loaded.metadata.signature.inputs.input_names() == ["hu", "spacing_mm"]
    assert loaded.metadata.metadata["ctv2v_thick_factor"] == 4
    thin = loaded.predict({"hu": thick.array, "spacing_mm": np.asarray(thick.spacing, dtype=np.float64)})

    assert cli_main(["predict", "--model", f"models:/{name}@{CHAMPION_ALIAS}", "--input", str(series),
                     "--out", str(tmp_path / "thin.nii.gz"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n"):])["output_shape"] == list(thin.shape)
    assert np.array_equal(read_volume(tmp_path / "thin.nii.gz").array, thin)

    client = MlflowClient(mlflow_server.uri)
    version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert version.run_id == tracker.run_id
    model_id = version.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == tracker.run_id
    assert {artifact.path for artifact in client.list_logged_model_artifacts(model_id)} >= {
        "MLmodel", "artifacts", "code", "input_example.json", "serving_input_example.json", "requirements.txt"}


def test_the_logged_model_is_built_from_code_pins_public_versions_and_its_input_example_predicts(
        mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    tracker = Tracker(tracking(mlflow_server.uri), tmp_path / "eval")
    name = f"ctv2v-test-{uuid.uuid4().hex[:6]}"
    with tracker.step_run("evaluate", new_pipeline_run_id(), variant="main"):
        tracker.register_model(tiny_model(tmp_path / "model"), name, FACTS)
    model_uri = f"models:/{name}/1"
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "logged")))
    # Models from code: the flavor names a code file, and no pickled Python object is stored.
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert not list(local.rglob("*.pkl"))
    # Every pin is a public release a package index serves (no local label such as torch's +cpu).
    pins = [Requirement(line) for line in (local / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("mlflow")]
    assert {pin.name for pin in pins} >= {"torch", "monai", "numpy"}
    for pin in pins:
        [spec] = pin.specifier
        assert spec.operator == "==" and Version(spec.version).local is None, pin
    # The logged input example goes through MLflow's serving-input validation, i.e. a real prediction.
    serving_input = (local / "serving_input_example.json").read_text()
    thin = validate_serving_input(model_uri, serving_input)
    example = json.loads((local / "input_example.json").read_text())
    n_thick = len(example["inputs"]["hu"]) if "inputs" in example else len(example["hu"])
    assert np.asarray(thin).shape[0] == (n_thick - 1) * 4 + 1


def test_registering_leaves_the_callers_mlflow_uri_as_it_was(mlflow_server, tmp_path, monkeypatch):
    """A library call must not pin MLflow's process-wide tracking URI: a notebook or service that registers a model
    under the config's URI keeps following MLFLOW_TRACKING_URI afterwards, including later changes of it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/the-callers-server")
    tracker = Tracker(tracking(mlflow_server.uri), tmp_path / "eval")
    with tracker.step_run("evaluate", new_pipeline_run_id(), variant="main"):
        registration = tracker.register_model(tiny_model(tmp_path / "model"), f"ctv2v-test-{uuid.uuid4().hex[:6]}",
                                              FACTS)
    assert registration.refusal is None
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:9/the-callers-server"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert mlflow.get_tracking_uri() == mlflow_server.uri


def test_evaluate_step_registers_a_tagged_smoke_version_that_never_becomes_champion(mlflow_server, tmp_path):
    from ctv2v.steps.evaluate import evaluate_step

    config = evaluation_config("evaluation.max_volumes=1", f"tracking.tracking_uri={mlflow_server.uri}",
                               f"tracking.experiment=test-{uuid.uuid4().hex[:8]}",
                               "tracking.system_metrics_interval_s=null")
    assert config.tracking.smoke_run  # configs/smoke.yaml says so
    data_dir = prepared_phantoms(tmp_path / "data", config, volumes=1, shape=(24, 24, 24))
    model_dir = tiny_model(tmp_path / "model", *EVALUATION_OVERRIDES, thick_spacing_mm=(5.0, 5.0))
    evaluation = evaluate_step(config, data_dir, model_dir, tmp_path / "eval")

    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.tracking.experiment).experiment_id],
                                filter_string="tags.`ctv2v.step` = 'evaluate'")
    (version,) = client.search_model_versions(f"name = 'ctv2v-main' and run_id = '{run.info.run_id}'")
    tags = version.tags
    assert (tags[TAG_WEIGHTS], tags[TAG_SMOKE]) == ("scratch", "true")
    assert tags[TAG_MANIFEST_SHA256] == evaluation.report.manifest_sha256
    assert len(tags[TAG_EVALUATION_SHA256]) == len(tags[TAG_CONFIG_SHA256]) == 64
    assert tags[TAG_GIT_COMMIT]
    assert float(tags[TAG_TEST_PSNR]) == pytest.approx(evaluation.headline_psnr)
    aliases = client.get_registered_model("ctv2v-main").aliases
    assert aliases.get("candidate") == version.version
    assert aliases.get(CHAMPION_ALIAS) != version.version


def _register(client: MlflowClient, experiment_id: str, name: str, facts: VersionFacts):
    """A version from a run of its own, its model a logged model without files (the rules read tags only)."""
    run = client.create_run(experiment_id)
    return register_version(
        client, name=name, run_id=run.info.run_id, facts=facts, pipeline_run_id="p", step_name="evaluate",
        log_model=lambda: client.create_logged_model(experiment_id, name="model",
                                                     source_run_id=run.info.run_id).model_id)


@pytest.fixture
def registry(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment(f"test-{uuid.uuid4().hex[:8]}")
    name = f"ctv2v-rules-{uuid.uuid4().hex[:6]}"
    return lambda facts: _register(client, experiment_id, name, facts)


def test_stand_in_and_smoke_versions_never_become_champion(registry):
    stand_in = registry(replace(FACTS, weights="stand-in", test_psnr=45.0))
    smoke = registry(replace(FACTS, smoke=True, test_psnr=45.0))
    assert not stand_in.champion and "stand-in" in stand_in.refusal
    assert not smoke.champion and "smoke run" in smoke.refusal
    first = registry(replace(FACTS, test_psnr=20.0))
    assert first.champion
    assert not registry(replace(FACTS, weights="stand-in", test_psnr=50.0)).champion


def test_champion_moves_only_to_a_better_score_on_the_same_test_set(registry):
    assert registry(replace(FACTS, test_psnr=30.0)).champion
    worse = registry(replace(FACTS, test_psnr=29.0))
    assert not worse.champion and "not above the champion's" in worse.refusal
    other_test_set = registry(replace(FACTS, evaluation_sha256="f" * 64, test_psnr=40.0))
    assert not other_test_set.champion and "another test set" in other_test_set.refusal
    assert not registry(replace(FACTS, test_psnr=float("nan"))).champion
    better = registry(replace(FACTS, test_psnr=31.0))
    assert better.champion
    assert not registry(replace(FACTS, test_psnr=30.5)).champion
