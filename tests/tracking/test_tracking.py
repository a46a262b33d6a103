"""ctv2v.tracking.runs against a real MLflow server (SQLite backend, artifacts proxied to a real S3 server)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from ctv2v.config import RunConfig, TrackingConfig
from ctv2v.config_io import flatten
from ctv2v.files import sha256_file
from ctv2v.tracking.hierarchy import new_pipeline_run_id
from ctv2v.tracking.journal import PENDING_PREFIX
from ctv2v.tracking.params import LONG_PARAMS_FILE
from ctv2v.tracking.runs import Tracker
from ctv2v.tracking.tags import TAG_PIPELINE_RUN_ID, TAG_RUN_ROLE
from tests.conftest import REPO
from tests.servers import free_port
from tests.tiny_model import FACTS, tiny_model

CALL_BOUND_S = 2 * 2 + 1.0
"""(max_retries + 1) x request timeout, plus slack for a loaded machine."""


@pytest.fixture(autouse=True)
def restore_mlflow_http_env(monkeypatch):
    """Trackers set MLflow's HTTP timeout and retries process-wide; monkeypatch restores them after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


def tracking_config(uri: str, **overrides) -> TrackingConfig:
    """Short timeouts, one retry, a fresh experiment per test; no metric flush timer unless a test sets one."""
    settings = dict(
        tracking_uri=uri, experiment=f"test-{uuid.uuid4().hex[:8]}", request_timeout_s=2, max_retries=1,
        flush_interval_s=3600, retry_interval_s=600, system_metrics_interval_s=None,
    )
    settings.update(overrides)
    return TrackingConfig(**settings)


def read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> bytes:
    """Download one artifact through the tracking server and return its bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst))).read_bytes()


def test_step_run_records_params_metrics_artifacts_and_nesting(mlflow_server, tmp_path):
    config = tracking_config(mlflow_server.uri, system_metrics_interval_s=0.2)
    pipeline_run_id = new_pipeline_run_id()
    resolved = flatten(RunConfig())
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 500)
    (tmp_path / "report.json").write_text('{"psnr": 31.5}')
    (tmp_path / "panels").mkdir()
    (tmp_path / "panels" / "a.png").write_bytes(b"\x89PNG fake panel a")
    (tmp_path / "panels" / "b.png").write_bytes(b"\x89PNG fake panel b")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"volumes": ["example_ct"]}))

    tracker = Tracker(config, tmp_path / "train-out")
    with tracker.step_run("train", pipeline_run_id, variant="main", phase="frozen", weights="scratch, fine-tuned",
                          kfp_run_id="kfp-123", tags={"ctv2v.note": "test"}):
        tracker.log_params({**resolved, "notes.long": long_value})
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        tracker.log_artifact(tmp_path / "report.json", "eval")
        tracker.log_artifacts(tmp_path / "panels", "panels")
        tracker.log_input_manifest(manifest)
        time.sleep(0.7)  # a few system-metric samples
    second = Tracker(config, tmp_path / "eval-out")
    with second.step_run("evaluate", pipeline_run_id, variant="main", weights="scratch"):
        second.log_metrics({"test/psnr": 30.0}, step=0)

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags[TAG_PIPELINE_RUN_ID] == pipeline_run_id
    assert (tags["ctv2v.step"], tags["ctv2v.variant"], tags["ctv2v.phase"], tags["ctv2v.weights"]) == (
        "train", "main", "frozen", "scratch")
    assert tags["ctv2v.weights_label"] == "scratch, fine-tuned"
    assert tags["ctv2v.kfp_run_id"] == "kfp-123" and tags["ctv2v.note"] == "test"
    assert tags["mlflow.source.git.commit"] and tags["ctv2v.image"]
    parent = client.get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags[TAG_RUN_ROLE] == "pipeline"
    assert parent.data.tags[TAG_PIPELINE_RUN_ID] == pipeline_run_id
    assert client.get_run(second.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(second.run_id).data.metrics["test/psnr"] == 30.0

    params = run.data.params
    assert {key: params[key] for key in resolved} == resolved
    assert len(params["notes.long"]) == MAX_PARAM_VAL_LENGTH and "full value in artifact" in params["notes.long"]
    full = json.loads(read_artifact(client, run.info.run_id, f"params/{LONG_PARAMS_FILE}", tmp_path / "dl"))
    assert full == {"notes.long": long_value}

    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (step, 1.0 / (step + 1)) for step in range(5)]
    assert any(key.startswith("system/cpu_utilization_percentage") for key in run.data.metrics)

    assert read_artifact(client, run.info.run_id, "eval/report.json", tmp_path / "dl") == b'{"psnr": 31.5}'
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "panels")) == ["panels/a.png", "panels/b.png"]
    assert read_artifact(client, run.info.run_id, "panels/b.png", tmp_path / "dl") == b"\x89PNG fake panel b"
    assert read_artifact(client, run.info.run_id, "inputs/manifest.json", tmp_path / "dl") == manifest.read_bytes()
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "manifest"
    assert dataset_input.dataset.digest == sha256_file(manifest)[:36]
    assert json.loads(dataset_input.dataset.source)["uri"] == str(manifest.resolve())
    assert not list((tmp_path / "train-out").glob(f"{PENDING_PREFIX}*"))


def test_failing_step_ends_its_run_failed(mlflow_server, tmp_path):
    tracker = Tracker(tracking_config(mlflow_server.uri), tmp_path)
    with pytest.raises(ZeroDivisionError):
        with tracker.step_run("train", new_pipeline_run_id()):
            tracker.log_metrics({"loss": 0.5}, step=0)
            _ = 1 / 0
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss"] == 0.5


def test_server_away_mid_run_and_at_start_then_back(mlflow_server, tmp_path):
    config = tracking_config(mlflow_server.uri)
    pipeline_run_id = new_pipeline_run_id()
    client = MlflowClient(mlflow_server.uri)
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"checkpoint bytes")
    model_dir = tiny_model(tmp_path / "model")
    model_name = f"ctv2v-away-{uuid.uuid4().hex[:6]}"

    train = Tracker(config, tmp_path / "train-out")
    with train.step_run("train", pipeline_run_id, variant="pretrained", weights="stand-in"):
        train.log_metrics({"loss": 1.0}, step=0)
        assert train.flush()
        mlflow_server.stop()
        try:
            started = time.monotonic()
            train.log_metrics({"loss": 0.5}, step=1)
            assert not train.flush()  # the one call that meets the dead server
            assert time.monotonic() - started < CALL_BOUND_S
            started = time.monotonic()
            train.log_artifact(checkpoint, "checkpoints")
            assert train.register_model(model_dir, model_name, FACTS) is None
            assert time.monotonic() - started < 0.5  # offline back-off: no network call at all
            pending = json.loads(train.pending_file.read_text())
            assert [a["artifact_path"] for a in pending["artifacts"]] == ["checkpoints"]
            assert [row[:2] + row[3:] for row in pending["metrics"]] == [["loss", 0.5, 1]]
            assert len(pending["registrations"]) == 1

            started = time.monotonic()
            evaluate = Tracker(config, tmp_path / "eval-out")  # a next step starting while the server is away
            assert not evaluate.check_health()
            with evaluate.step_run("evaluate", pipeline_run_id, variant="pretrained"):
                evaluate.log_metrics({"test/psnr": 28.0}, step=0)
                evaluate.log_artifact(checkpoint, "inputs")
            assert time.monotonic() - started < 3 * CALL_BOUND_S
            assert evaluate.run_id is None
            (evaluate_journal,) = (tmp_path / "eval-out").glob(f"{PENDING_PREFIX}evaluate-*.json")
            assert json.loads(evaluate_journal.read_text())["closed"]
        finally:
            mlflow_server.start()
        assert train.flush_pending()
        assert train.pending_file is None
    assert read_artifact(client, train.run_id, "checkpoints/ckpt.pt", tmp_path / "dl") == b"checkpoint bytes"
    run = client.get_run(train.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_model_version_by_alias(model_name, "candidate").run_id == train.run_id
    assert sorted((m.step, m.value) for m in client.get_metric_history(train.run_id, "loss")) == [(0, 1.0), (1, 0.5)]

    compare = Tracker(config, tmp_path / "compare-out")  # the step after: uploads what `evaluate` left behind
    with compare.step_run("compare", pipeline_run_id):
        assert compare.flush_pending(tmp_path / "eval-out")
    assert not evaluate_journal.exists()
    (evaluate_run,) = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`ctv2v.step` = 'evaluate'")
    assert evaluate_run.info.status == "FINISHED"
    assert evaluate_run.data.metrics["test/psnr"] == 28.0
    assert evaluate_run.data.tags["mlflow.parentRunId"] == run.data.tags["mlflow.parentRunId"]
    assert read_artifact(client, evaluate_run.info.run_id, "inputs/ckpt.pt", tmp_path / "dl2") == b"checkpoint bytes"


def test_hanging_server_costs_one_timeout_then_no_calls_until_retry_interval(tmp_path):
    # A listening socket that never answers: connects succeed, reads time out (MLflow's default would wait 120 s).
    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)
        uri = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        config = tracking_config(uri, request_timeout_s=2, max_retries=0)
        started = time.monotonic()
        tracker = Tracker(config, tmp_path)  # its health check meets the hanging server
        first_check_s = time.monotonic() - started
        with tracker.step_run("train", new_pipeline_run_id()):
            started = time.monotonic()
            for step in range(3):
                tracker.log_metrics({"loss": 1.0}, step=step)
                tracker.flush()
            offline_calls_s = time.monotonic() - started
            assert tracker.run_id is None
        assert len(json.loads(tracker.pending_file.read_text())["metrics"]) == 3
    assert first_check_s < 2 * 2  # one 2 s timeout (plus slack), not MLflow's 120 s default
    assert offline_calls_s < 2  # inside the retry interval nothing waits on the network


def test_server_errors_that_are_not_outages_raise(mlflow_server, tmp_path):
    tracker = Tracker(tracking_config(mlflow_server.uri), tmp_path)
    with pytest.raises(MlflowException, match="bad//name"):
        with tracker.step_run("train", new_pipeline_run_id()):
            tracker.log_metrics({"loss": 1.0}, step=0)
            tracker.log_metrics({"bad//name": 1.0}, step=0)
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert tracker.pending_file is None


def test_tracking_off_without_uri_says_so_once_and_still_checks_arguments(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level(logging.INFO, logger="ctv2v.tracking.runs"):
        tracker = Tracker(TrackingConfig(), tmp_path)
    assert not tracker.enabled
    assert [r.getMessage() for r in caplog.records if r.name == "ctv2v.tracking.runs"] == [
        "MLflow tracking is off: neither tracking.tracking_uri nor MLFLOW_TRACKING_URI is set"]
    with tracker.step_run("train", new_pipeline_run_id()):
        tracker.log_params({"a": "1"})
        tracker.log_metrics({"loss": 1.0}, step=0)
        with pytest.raises(ValueError, match="param 'a' was already logged"):
            tracker.log_params({"a": "2"})
        with pytest.raises(FileNotFoundError, match="missing.pt"):
            tracker.log_artifact(tmp_path / "missing.pt")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", request_timeout_s=1,
                                     max_retries=0, system_metrics_interval_s=None), tmp_path)
    with pytest.raises(RuntimeError, match="outside `with tracker.step_run"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(ValueError, match="weights label 'random'"):
        with tracker.step_run("train", new_pipeline_run_id(), weights="random"):
            pass
    with pytest.raises(ValueError, match="pipeline_run_id"):
        with tracker.step_run("train", "run id with spaces' or 1=1"):
            pass


SKINNY_CLIENT = """
import sys
sys.modules["pandas"] = None  # the client image has mlflow-skinny, without pandas
from pathlib import Path
from ctv2v.config import TrackingConfig
from ctv2v.tracking.runs import Tracker
uri, out, experiment = sys.argv[1:4]
manifest = Path(out) / "manifest.json"
manifest.parent.mkdir(parents=True)
manifest.write_text("{}")
tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment=experiment, system_metrics_interval_s=None), Path(out))
with tracker.step_run("train", "local-skinny"):
    tracker.log_input_manifest(manifest)
    tracker.log_metrics({"loss": 0.25}, step=3)
print(tracker.run_id)
"""


def test_client_works_without_pandas(mlflow_server, tmp_path):
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-c", SKINNY_CLIENT, mlflow_server.uri, str(tmp_path / "out"), experiment],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    run = MlflowClient(mlflow_server.uri).get_run(result.stdout.split()[-1])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["loss"] == 0.25
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["manifest"]
