"""The MLflow run lifecycle against a real MLflow server: the exit handler ends the pipeline's parent run, a
retried step keeps its run, pending journals are uploaded once, and KFP's own MLflow runs are logged into."""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.
import json
import uuid
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local
from mlflow import MlflowClient

from components.finish_run import finish_run_op
from ctv2v.config import TrackingConfig
from ctv2v.data.prepared import run_workspace
from ctv2v.steps.finish_run import finish_run_step
from ctv2v.tracking.hierarchy import new_pipeline_run_id
from ctv2v.tracking.runs import RUN_FILE_PREFIX, Tracker
from ctv2v.tracking.tags import TAG_PIPELINE_RUN_ID, TAG_RUN_ROLE
from pipeline.cli import main as cli_main
from tests.conftest import smoke_config
from tests.lifecycle_components import logging_step_op
from tests.servers import free_port


@pytest.fixture(autouse=True)
def restore_mlflow_http_env(monkeypatch):
    """Trackers set MLflow's HTTP timeout and retries process-wide; monkeypatch restores them after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def tracking(uri: str) -> TrackingConfig:
    """A fresh experiment; short timeouts; metrics buffered until the step ends."""
    return TrackingConfig(tracking_uri=uri, experiment=f"test-{uuid.uuid4().hex[:8]}", request_timeout_s=2,
                          max_retries=1, flush_interval_s=3600, retry_interval_s=600,
                          system_metrics_interval_s=None)


def pipeline_runs(client: MlflowClient, config: TrackingConfig) -> tuple[list, list]:
    """(parent runs, step runs) of the experiment."""
    experiment = client.get_experiment_by_name(config.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return ([r for r in runs if r.data.tags.get(TAG_RUN_ROLE) == "pipeline"],
            [r for r in runs if r.data.tags.get(TAG_RUN_ROLE) == "step"])


@dsl.pipeline(name="lifecycle")
def lifecycle_pipeline(config_json: str, workspace_root: str, fail: bool):
    """Two tracked steps inside the exit handler the ctv2v DAG uses."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    finish = finish_run_op(config_json=config_json, workspace_root=workspace_root, pipeline_run_id=run_id,
                           scratch_cleanup="never")
    with dsl.ExitHandler(finish):
        first = logging_step_op(config_json=config_json, workspace_root=workspace_root, pipeline_run_id=run_id,
                                step="first", fail=False)
        logging_step_op(config_json=config_json, workspace_root=workspace_root, pipeline_run_id=run_id,
                        step="second", fail=fail).after(first)


@pytest.mark.parametrize(("fail", "parent_status"), [(False, "FINISHED"), (True, "FAILED")])
def test_exit_handler_ends_the_parent_run_by_the_pipeline_outcome_under_kfp_local(mlflow_server, tmp_path, fail,
                                                                                 parent_status):
    config = smoke_config(f"tracking.tracking_uri={mlflow_server.uri}",
                          f"tracking.experiment=test-{uuid.uuid4().hex[:8]}", "tracking.system_metrics_interval_s=null")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=False)
    lifecycle_pipeline(config_json=config.model_dump_json(), workspace_root=str(tmp_path / "workspace"), fail=fail)

    client = MlflowClient(mlflow_server.uri)
    (parent,), steps = pipeline_runs(client, config.tracking)
    assert parent.info.status == parent_status
    assert parent.info.end_time is not None
    assert {r.data.tags["mlflow.parentRunId"] for r in steps} == {parent.info.run_id}
    assert {r.data.tags["ctv2v.step"]: r.info.status for r in steps} == {
        "first": "FINISHED", "second": "FAILED" if fail else "FINISHED"}


def test_the_ctv2v_dag_runs_finish_run_as_its_exit_handler_with_the_final_status(tmp_path):
    from kfp import compiler

    from pipeline.dag import build_pipeline

    compiler.Compiler().compile(build_pipeline(smoke_config()), str(tmp_path / "pipeline.yaml"))
    spec = next(yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"exit-handler-1", "finish-run-op"}
    finish = tasks["finish-run-op"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert "prepare-data-op" in spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_a_retried_step_logs_into_its_first_attempts_run(mlflow_server, tmp_path):
    config = tracking(mlflow_server.uri)
    pipeline_run_id = new_pipeline_run_id()
    out_dir = tmp_path / "train-frozen-main"
    first = Tracker(config, out_dir)
    with pytest.raises(RuntimeError, match="preempted"), first.step_run("train-frozen", pipeline_run_id):
        first.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("node preempted")
    assert json.loads((out_dir / f"{RUN_FILE_PREFIX}train-frozen.json").read_text())["run_id"] == first.run_id

    retry = Tracker(config, out_dir)
    with retry.step_run("train-frozen", pipeline_run_id):
        assert MlflowClient(mlflow_server.uri).get_run(first.run_id).info.status == "RUNNING"
        retry.log_metrics({"loss": 0.5}, step=1)
    assert retry.run_id == first.run_id
    client = MlflowClient(mlflow_server.uri)
    _, steps = pipeline_runs(client, config)
    assert [r.info.run_id for r in steps] == [first.run_id]
    assert steps[0].info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")) == [(0, 1.0), (1, 0.5)]


def test_a_retry_takes_over_what_a_killed_attempt_left_pending(mlflow_server, tmp_path):
    config = tracking(mlflow_server.uri)
    pipeline_run_id = new_pipeline_run_id()
    out_dir = tmp_path / "train-vae"
    killed = Tracker(config, out_dir)
    # The pod dies inside the step: nothing closes the run. Its exit code never runs, and must not run later
    # either, when garbage collection closes the abandoned context manager during another test.
    killed_step = killed.step_run("train-vae", pipeline_run_id)
    killed_step.__enter__()
    killed.close = lambda status="FINISHED": False
    killed.log_metrics({"loss": 2.0}, step=0)
    mlflow_server.stop()
    try:
        assert not killed.flush(force=True)  # the metric waits in the killed attempt's pending journal
    finally:
        mlflow_server.start()
    retry = Tracker(config, out_dir)
    with retry.step_run("train-vae", pipeline_run_id):
        retry.log_metrics({"loss": 1.0}, step=1)
    assert retry.run_id == killed.run_id
    assert not list(out_dir.glob("mlflow-pending-*.json"))
    client = MlflowClient(mlflow_server.uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(retry.run_id, "loss")) == [(0, 2.0), (1, 1.0)]
    assert len(pipeline_runs(client, config)[1]) == 1


def test_journal_left_while_the_server_was_away_is_uploaded_once_by_the_exit_handler(mlflow_server, tmp_path,
                                                                                     capsys):
    config = tracking(mlflow_server.uri)
    pipeline_run_id = new_pipeline_run_id()
    run_dir = run_workspace(tmp_path / "workspace", pipeline_run_id)
    step = Tracker(config, run_dir / "train-full-main")
    try:
        with step.step_run("train-full", pipeline_run_id):
            step.log_metrics({"loss": 1.0}, step=0)
            assert step.flush(force=True)
            mlflow_server.stop()
            step.log_metrics({"loss": 0.5}, step=1)
    finally:
        mlflow_server.start()
    (journal,) = run_dir.rglob("mlflow-pending-*.json")

    finished = finish_run_step(config, run_dir, pipeline_run_id, "SUCCEEDED")
    assert [(u.journal, u.sent["metrics"], u.complete) for u in finished.uploads] == [(journal, 1, True)]
    assert not journal.exists()
    capsys.readouterr()
    assert cli_main(["tracking", "sync", str(run_dir)]) == 0  # idempotent: nothing left to send twice
    assert capsys.readouterr().out.strip() == f"nothing pending under {run_dir}"

    client = MlflowClient(mlflow_server.uri)
    (parent,), (run,) = pipeline_runs(client, config)
    assert finished.parent_run_id == parent.info.run_id
    assert parent.info.status == "FINISHED" and run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")) == [(0, 1.0),
                                                                                                       (1, 0.5)]


def test_tracking_sync_prints_what_it_uploaded_and_skips_running_steps(mlflow_server, tmp_path, capsys):
    config = tracking(mlflow_server.uri)
    pipeline_run_id = new_pipeline_run_id()
    mlflow_server.stop()
    try:
        closed = Tracker(config, tmp_path / "evaluate")
        with closed.step_run("evaluate", pipeline_run_id):
            closed.log_params({"seed": 0})
            closed.log_metrics({"test/psnr": 30.0}, step=0)
        running = Tracker(config, tmp_path / "train")
        running_step = running.step_run("train", pipeline_run_id)  # kept: a collected generator would close it
        running_step.__enter__()
        running.log_metrics({"loss": 1.0}, step=0)
        running.flush(force=True)
    finally:
        mlflow_server.start()
    assert cli_main(["tracking", "sync", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("uploaded ") and "step evaluate" in line and "1 params, 1 metrics" in line
               and line.endswith("; done") for line in lines), lines
    assert any(line.startswith("skipped ") and "its step has not ended" in line for line in lines), lines
    assert len(list((tmp_path / "train").glob("mlflow-pending-*.json"))) == 1
    client = MlflowClient(mlflow_server.uri)
    (run,) = [r for r in pipeline_runs(client, config)[1] if r.data.tags["ctv2v.step"] == "evaluate"]
    assert run.data.metrics == {"test/psnr": 30.0} and run.info.status == "FINISHED"

    assert cli_main(["tracking", "sync", "--ended", str(tmp_path)]) == 0  # the pipeline is over: the train step died
    (train,) = [r for r in pipeline_runs(client, config)[1] if r.data.tags["ctv2v.step"] == "train"]
    assert train.info.status == "FAILED" and train.data.metrics == {"loss": 1.0}


def test_tracking_sync_uploads_to_the_server_the_user_chooses_and_says_so(mlflow_server, tmp_path, capsys,
                                                                          monkeypatch):
    """Journals name the address their step used (in a cluster, a name this machine cannot resolve): the user picks
    the server, --tracking-uri over MLFLOW_TRACKING_URI over the journal's address, and each line says which one
    and what went up."""
    unreachable = f"http://127.0.0.1:{free_port()}"
    config = tracking(unreachable)
    pipeline_run_id = new_pipeline_run_id()
    for step in ("first", "second"):
        tracker = Tracker(config, tmp_path / step)
        with tracker.step_run(step, pipeline_run_id):
            tracker.log_params({"seed": 0})
            tracker.log_metrics({"loss": 1.0}, step=0)
            tracker.log_metrics({"loss": 0.5}, step=1)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert cli_main(["tracking", "sync", str(tmp_path / "first")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("uploaded ")]
    assert line.startswith(f"uploaded {tmp_path / 'first'}/mlflow-pending-first-")
    assert line.endswith(f" to {mlflow_server.uri} (from MLFLOW_TRACKING_URI): step first, run "
                         f"{line.split(' run ')[1].split(':')[0]}: 1 runs, 1 params, 2 metrics; done")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", unreachable)
    assert cli_main(["tracking", "sync", "--tracking-uri", mlflow_server.uri, str(tmp_path / "second")]) == 0
    assert f" to {mlflow_server.uri} (from --tracking-uri): step second," in capsys.readouterr().out

    client = MlflowClient(mlflow_server.uri)
    runs = {run.data.tags["ctv2v.step"]: run for run in pipeline_runs(client, config)[1]}
    assert sorted(runs) == ["first", "second"]
    for run in runs.values():
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")) == [(0, 1.0),
                                                                                                           (1, 0.5)]
    assert not list(tmp_path.rglob("mlflow-pending-*.json"))


def test_under_kfps_mlflow_integration_a_step_logs_into_the_run_kfp_made(mlflow_server, tmp_path, monkeypatch):
    client = MlflowClient(mlflow_server.uri)
    config = tracking(mlflow_server.uri)
    experiment_id = client.create_experiment(config.experiment)
    # What KFP's API server and driver make: a parent run per pipeline run and a nested run per task.
    kfp_parent = client.create_run(experiment_id, run_name="kfp-pipeline-run")
    kfp_task = client.create_run(experiment_id, run_name="train-frozen-main",
                                 tags={"mlflow.parentRunId": kfp_parent.info.run_id})
    monkeypatch.setenv("MLFLOW_RUN_ID", kfp_task.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)

    step = Tracker(config, tmp_path / "train")
    with step.step_run("train-frozen", "kfp-run-1", variant="main"):
        step.log_metrics({"loss": 1.0}, step=0)
    assert step.run_id == kfp_task.info.run_id
    assert finish_run_step(config, tmp_path, "kfp-run-1", "SUCCEEDED").parent_run_id is None

    runs = client.search_runs([experiment_id])
    assert {r.info.run_id for r in runs} == {kfp_parent.info.run_id, kfp_task.info.run_id}
    task = client.get_run(kfp_task.info.run_id)
    assert task.data.metrics == {"loss": 1.0}
    assert task.data.tags["ctv2v.step"] == "train-frozen" and task.data.tags[TAG_PIPELINE_RUN_ID] == "kfp-run-1"
    assert task.info.status == "RUNNING"  # KFP ends the runs it made
    assert client.get_run(kfp_parent.info.run_id).info.status == "RUNNING"
    assert not list(Path(tmp_path / "train").glob(f"{RUN_FILE_PREFIX}*"))
