"""`ctv2v pipeline submit` through kfp.Client against a loopback stub of the KFP v2beta1 API."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from tests.kfp_stub import KfpStub

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def kfp_stub():
    stub = KfpStub()
    host = stub.start()
    yield stub, host
    stub.stop()


def _posts(stub: KfpStub, path: str) -> list:
    return [r for r in stub.requests if r.method == "POST" and r.path.split("?")[0] == path]


def test_submit_creates_the_experiment_and_a_run_with_the_resolved_config(kfp_stub, capsys):
    stub, host = kfp_stub
    code = cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct", "--experiment", "ctv2v-v100",
                     "--token", "test-token-123", "--config", str(CONFIGS / "pretrained.yaml"),
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
    assert params["branches"] == "both"
    submitted = yaml.safe_load(params["config"])
    assert submitted["variant"] == "pretrained" and submitted["training"]["frozen"]["epochs"] == 3
    assert run["display_name"].startswith("ctv2v-both-")
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "ctv2v"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(e["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "Tesla-V100-SXM2-32GB"}
               for label, e in executors.items() if label.startswith("exec-train"))
    assert all(r.headers.get("authorization") == "Bearer test-token-123" for r in stub.requests)


def test_submit_with_a_cookie_sends_it(kfp_stub):
    stub, host = kfp_stub
    assert cli_main(["pipeline", "submit", "--host", host, "--namespace", "team-ct",
                     "--cookie", "authservice_session=abc", "--config", str(CONFIGS / "main.yaml"),
                     "--branches", "main"]) == 0
    run = _posts(stub, "/apis/v2beta1/runs")[0].json()
    assert run["runtime_config"]["parameters"]["branches"] == "main"
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
