"""`ctv2v pipeline submit` through kfp.Client against a loopback stub of the KFP v2beta1 API: the run it creates,
where it finds the server and its token (in-cluster token file, token file, token environment variable; never a
log line), token renewal during --wait, and the check of the server's KFP version."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.submit import IN_CLUSTER_HOST, SubmitError, resolve_connection
from tests.kfp_stub import KfpStub

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def kfp_stub():
    stub = KfpStub()
    host = stub.start()
    yield stub, host
    stub.stop()


def _posts(stub: KfpStub, path: str) -> list:
    return [r for r in stub.requests if r.method == "POST" and r.path.split("?")[0] == path]


TOKEN = "tok-sentinel-4f0c2a9e"
"""A token value that must reach the Authorization header and nothing else (logs, stdout, stderr)."""


def test_submit_creates_the_experiment_and_a_run_with_the_resolved_config(kfp_stub, capsys, monkeypatch):
    stub, host = kfp_stub
    monkeypatch.setenv("KFP_TOKEN", "test-token-123")
    code = cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct", "--experiment", "ctv2v-v100",
                     "--token-env", "KFP_TOKEN", "--config", str(CONFIGS / "pretrained.yaml"),
                     "--set", "training.frozen.epochs=3", "--branches", "both"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("run-1")
    experiments = _posts(stub, "/apis/v2beta1/experiments")
    assert experiments[0].json()["display_name"] == "ctv2v-v100"
    assert experiments[0].json()["namespace"] == "team-ct"
    (run_request,) = _posts(stub, "/apis/v2beta1/runs")
    run = run_request.json()
    assert run["experiment_id"] == "exp-1"
    assert run["service_account"] == "ctv2v-pipeline"
    params = run["runtime_config"]["parameters"]
    assert set(params) == {"config"}, "the typed run parameters keep their defaults: the config's values"
    submitted = yaml.safe_load(params["config"])
    assert submitted["variant"] == "pretrained" and submitted["training"]["frozen"]["epochs"] == 3
    assert run["display_name"].startswith("ctv2v-both-")
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "ctv2v"
    defaults = run["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["frozen_epochs"]["defaultValue"] == 3 and defaults["data_source"]["defaultValue"] == "demo"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["nodeAffinity"][0]["matchExpressions"][0]["values"][0] == "Tesla-V100-SXM2-32GB"
               for label, e in executors.items() if label.startswith("exec-train"))
    assert all(r.headers.get("authorization") == "Bearer test-token-123" for r in stub.requests)


def test_submit_with_a_cookie_of_an_old_install_sends_it(kfp_stub, monkeypatch):
    stub, host = kfp_stub
    monkeypatch.setenv("KFP_COOKIE", "authservice_session=abc")
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--cookie-env", "KFP_COOKIE", "--config", str(CONFIGS / "main.yaml"),
                     "--variant", "main"]) == 0
    run = _posts(stub, "/apis/v2beta1/runs")[0].json()
    executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"]
    assert "exec-train-vae-op" in executors and not {"exec-match-architecture-op", "exec-compare-op"} & set(executors)
    assert run["display_name"].startswith("ctv2v-main-")
    assert all(r.headers.get("cookie") == "authservice_session=abc" for r in stub.requests)


@pytest.mark.parametrize("state, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_wait_follows_the_run_and_fails_when_it_fails(kfp_stub, monkeypatch, state, code, capsys):
    stub, host = kfp_stub
    stub.run_state = state
    monkeypatch.setattr("pipeline.submit.DEFAULT_POLL_S", 0)
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--config", str(CONFIGS / "main.yaml"), "--wait"]) == code
    assert any(r.method == "GET" and r.path.startswith("/apis/v2beta1/runs/run-1") for r in stub.requests)
    if state == "FAILED":
        assert "finished as FAILED" in capsys.readouterr().err


def test_submit_refuses_a_bad_config_before_talking_to_the_server(kfp_stub, capsys):
    stub, host = kfp_stub
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--config", str(CONFIGS / "main.yaml"), "--set", "training.frozen.epoch=3"]) == 2
    assert stub.requests == []
    assert "did you mean 'training.frozen.epochs'" in capsys.readouterr().err


def _assert_token_only_in_headers(stub: KfpStub, token: str, caplog, capsys) -> None:
    assert stub.requests and all(r.headers.get("authorization") == f"Bearer {token}" for r in stub.requests)
    out, err = capsys.readouterr()
    assert token not in out and token not in err
    assert not [r for r in caplog.records if token in r.getMessage()]


def test_inside_a_cluster_no_host_is_needed_and_the_service_account_token_is_sent(kfp_stub, tmp_path, monkeypatch,
                                                                                 caplog, capsys):
    stub, host = kfp_stub
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    # The stub stands in for the in-cluster address (no cluster DNS here); KFP's variable for it.
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", host)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    caplog.set_level(logging.DEBUG)
    assert cli_main(["pipeline", "submit", "--namespace", "team-ct", "--config", str(CONFIGS / "main.yaml")]) == 0
    assert _posts(stub, "/apis/v2beta1/runs")
    _assert_token_only_in_headers(stub, TOKEN, caplog, capsys)


def test_a_token_from_the_environment_reaches_the_header_and_no_log(kfp_stub, monkeypatch, caplog, capsys):
    stub, host = kfp_stub
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct", "--token-env", "KFP_TOKEN",
                     "--config", str(CONFIGS / "main.yaml")]) == 0
    _assert_token_only_in_headers(stub, TOKEN, caplog, capsys)


def test_a_renewed_token_file_is_used_during_a_long_wait(kfp_stub, tmp_path, monkeypatch):
    stub, host = kfp_stub
    token_file = tmp_path / "token"
    token_file.write_text("first-token")
    stub.run_states_before = ["RUNNING", "RUNNING"]

    def renew(poll: int) -> None:
        if poll == 1:
            token_file.write_text("renewed-token")

    stub.on_run_poll = renew
    monkeypatch.setattr("pipeline.submit.DEFAULT_POLL_S", 0)
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct", "--token-file", str(token_file),
                     "--config", str(CONFIGS / "main.yaml"), "--wait"]) == 0
    polls = [r for r in stub.requests if r.method == "GET" and r.path.startswith("/apis/v2beta1/runs/run-1")]
    assert len(polls) == 3
    assert polls[0].headers["authorization"] == "Bearer first-token"
    assert [p.headers["authorization"] for p in polls[1:]] == ["Bearer renewed-token"] * 2


def test_a_server_older_than_the_pipeline_needs_is_refused_before_anything_is_created(kfp_stub, capsys):
    stub, host = kfp_stub
    stub.server_version = "2.5.0"  # Kubeflow 1.10.1
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--config", str(CONFIGS / "main.yaml")]) == 1
    assert "this pipeline needs KFP >= 2.14.0" in capsys.readouterr().err  # node affinity, for the default 2.15
    assert not [r for r in stub.requests if r.method == "POST"]
    # Compiled for that backend (nodeSelector instead of node affinity) it is accepted.
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--config", str(CONFIGS / "main.yaml"), "--set", "cluster.kfp_backend='2.5'"]) == 0


def test_a_token_on_the_command_line_is_not_accepted(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--token", "abc",
                  "--config", str(CONFIGS / "main.yaml")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("environ, host", [
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, IN_CLUSTER_HOST),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KF_PIPELINES_ENDPOINT": "http://kfp.internal:8888"},
     "http://kfp.internal:8888"),
])
def test_inside_a_cluster_the_host_defaults_to_kfps_in_cluster_address(environ, host):
    assert resolve_connection(None, None, None, environ=environ).host == host


def test_outside_a_cluster_without_host_or_with_a_missing_token_submission_stops(tmp_path):
    with pytest.raises(SubmitError, match="no --host"):
        resolve_connection(None, None, None, environ={})
    with pytest.raises(SubmitError, match="not set or empty"):
        resolve_connection("http://kfp.test", None, "KFP_TOKEN", environ={})
    with pytest.raises(SubmitError, match="missing or empty"):
        resolve_connection("http://kfp.test", tmp_path / "absent", None, environ={})
