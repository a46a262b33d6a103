"""The compare step: main vs pretrained side by side with the baselines, refusing reports that do not compare."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from kfp.dsl import HTML, Artifact, Markdown, PipelineTaskFinalStatus
from mlflow import MlflowClient

from components.compare import compare_op
from components.finish_run import finish_run_op
from ctv2v.steps.compare import compare_step
from ctv2v.evaluate.compare import ComparisonError, compare, load_report
from ctv2v.config import TrackingConfig
from ctv2v.evaluate.metrics import METRICS, SLICE_SETS, column_label
from ctv2v.tracking.tags import TAG_PIPELINE_RUN_ID, TAG_STEP
from ctv2v.data.prepared import run_workspace
from ctv2v.tracking.hierarchy import new_pipeline_run_id
from pipeline.cli import main as cli_main
from tests.conftest import (EVALUATION_PHANTOM, LinearInterpolationSampler, evaluation_config, prepared_phantoms,
                            run_evaluate)

STAND_IN = "stand-in (random MAISI-layout weights)"


class NearestSliceSampler(LinearInterpolationSampler):
    """TEST-ONLY stand-in model that repeats each thick frame k times (a worse model than linear)."""

    interpolation = None
    """Samples from the thick clip alone (no interpolated clip needed)."""

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return thick.repeat_interleave(self.factor, dim=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Evaluation folders of `main` (linear stand-in, scratch label) and `pretrained` (nearest stand-in, stand-in
    label) on the same data, plus the data folder."""
    root = tmp_path_factory.mktemp("compare")
    config = evaluation_config("evaluation.max_volumes=1")
    data_dir = prepared_phantoms(root / "data", config, volumes=2, shape=EVALUATION_PHANTOM)
    run_evaluate(LinearInterpolationSampler(4), data_dir, config, root / "main", weights_label="scratch")
    pretrained = evaluation_config("evaluation.max_volumes=1", "variant=pretrained")
    run_evaluate(NearestSliceSampler(4), data_dir, pretrained, root / "pretrained", weights_label="stand-in")
    return root, data_dir


def reports(root: Path, **folders: str) -> dict:
    return {variant: load_report(root / folder) for variant, folder in folders.items()}


def test_table_labels_stand_in_weights_and_lists_baselines(runs, tmp_path):
    root, _ = runs
    markdown, html = compare(reports(root, main="main", pretrained="pretrained"), tmp_path)
    lines = markdown.splitlines()
    assert STAND_IN in lines[0] and "main [VAE trained from scratch]" in lines[0]
    pretrained_row = next(line for line in lines if line.startswith("| pretrained model |"))
    assert STAND_IN in pretrained_row
    for method in ("nearest", "linear", "cubic"):
        assert any(line.startswith(f"| {method} interpolation | no learning |") for line in lines)
    assert "**HU range (metrics)**: [-1000, 1000]" in markdown
    assert "slab_average x4: slab average over 5 mm every 5 mm" in markdown
    assert "**Sampling steps**: main: 2, pretrained: 2" in markdown
    assert "pretrained does not beat main" in markdown and "WARNING (pretrained): STAND-IN WEIGHTS" in markdown
    assert f"<h1>ctv2v evaluation: main [VAE trained from scratch] vs pretrained [{STAND_IN}]</h1>" in html
    assert html.count(STAND_IN) >= 3  # header, settings, pretrained row
    assert (tmp_path / "comparison.md").read_text() == markdown
    assert (tmp_path / "comparison.html").read_text() == html


def test_with_data_consistency_the_verdict_names_the_best_non_learned_reference(runs, tmp_path):
    """The `+dc` baselines are what a data-consistent model must beat: they are rows of the table, and the verdict
    compares each model with the best reference, not only with plain linear interpolation."""
    root, data_dir = runs
    for variant, sampler, label in (("main", LinearInterpolationSampler(4), "scratch"),
                                    ("pretrained", NearestSliceSampler(4), "stand-in")):
        config = evaluation_config("evaluation.max_volumes=1", f"variant={variant}", "evaluation.data_consistency=true")
        run_evaluate(sampler, data_dir, config, tmp_path / variant, weights_label=label)
    loaded = reports(tmp_path, main="main", pretrained="pretrained")
    markdown, _ = compare(loaded, tmp_path / "cmp")
    references = {m: s["synthesized"]["psnr_db"] for m, s in loaded["main"].aggregate.items() if m != "model"}
    assert {"linear+dc", "cubic+dc"} <= set(references)
    assert "| cubic+dc interpolation | no learning, projected onto the thick slices |" in markdown
    best = max(references, key=references.get)
    model = loaded["main"].aggregate["model"]["synthesized"]["psnr_db"]
    assert f"the best non-learned reference, {best} interpolation: {model:.2f} vs {references[best]:.2f} dB" in markdown
    with pytest.raises(ComparisonError, match="scored references differ"):
        compare({"main": loaded["main"], "pretrained": load_report(root / "pretrained")}, tmp_path / "mixed")


def test_table_numbers_come_from_the_reports(runs, tmp_path):
    root, _ = runs
    loaded = reports(root, main="main", pretrained="pretrained")
    markdown, _ = compare(loaded, tmp_path)
    main_row = next(line for line in markdown.splitlines() if line.startswith("| main model |"))
    cells = [cell.strip() for cell in main_row.strip("|").split("|")]
    psnr_all = loaded["main"].aggregate["model"]["all"]["psnr_db"]
    mae_syn = loaded["main"].aggregate["model"]["synthesized"]["mae_hu"]
    assert cells[2] == f"{psnr_all:.2f}" and cells[-1] == f"{mae_syn:.1f}"


def test_table_has_a_column_per_metric_and_slice_set_with_the_metric_tables_label_and_digits(runs, tmp_path):
    root, _ = runs
    loaded = reports(root, main="main", pretrained="pretrained")
    markdown, page = compare(loaded, tmp_path)
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    labels = [cell.strip() for cell in header.strip("|").split("|")][2:]
    assert labels == [column_label(metric, slice_set) for metric in METRICS for slice_set in SLICE_SETS]
    assert labels[:2] == ["PSNR dB (all)", "PSNR dB (synth.)"] and labels[-1] == "MAE HU (synth.)"
    assert all(f"<th>{label}</th>" in page for label in labels)
    row = next(line for line in lines if line.startswith("| pretrained model |"))
    cells = dict(zip(labels, (cell.strip() for cell in row.strip("|").split("|")[2:])))
    scores = loaded["pretrained"].aggregate["model"]
    for metric in METRICS:
        for slice_set in SLICE_SETS:
            cell = cells[column_label(metric, slice_set)]
            assert cell == f"{scores[slice_set][metric.name]:.{metric.digits}f}"
            assert len(cell.split(".")[1]) == {"psnr_db": 2, "ssim_3d": 4, "ssim_2d": 4, "mae_hu": 1}[metric.name]


@pytest.mark.parametrize("override, problem", [
    (("evaluation.hu_min=-1024",), "HU range differs"),
    (("data.thick.method=subsample",), "thick-slice method differs"),
])
def test_refuses_reports_with_other_settings(runs, tmp_path, override, problem):
    root, data_dir = runs
    config = evaluation_config("evaluation.max_volumes=1", "variant=pretrained", *override)
    run_evaluate(LinearInterpolationSampler(4), data_dir, config, tmp_path / "other", weights_label="stand-in")
    with pytest.raises(ComparisonError, match=problem):
        compare({"main": load_report(root / "main"), "pretrained": load_report(tmp_path / "other")}, tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_refuses_reports_from_another_manifest(runs, tmp_path):
    root, _ = runs
    config = evaluation_config("evaluation.max_volumes=1", "variant=pretrained")
    # Same first test volume (same content, same id), but the manifest also lists a third volume.
    other_data = prepared_phantoms(tmp_path / "data", config, volumes=3, shape=EVALUATION_PHANTOM)
    run_evaluate(LinearInterpolationSampler(4), other_data, config, tmp_path / "other", weights_label="stand-in")
    other = load_report(tmp_path / "other")
    assert other.volume_ids == load_report(root / "main").volume_ids
    with pytest.raises(ComparisonError, match="manifest differs"):
        compare({"main": load_report(root / "main"), "pretrained": other}, tmp_path / "cmp")


def test_refuses_a_report_under_the_wrong_variant_and_a_single_report(runs, tmp_path):
    root, data_dir = runs
    with pytest.raises(ComparisonError, match="report given as 'pretrained' was made by variant 'main'"):
        compare(reports(root, pretrained="main", main="main"), tmp_path)
    with pytest.raises(ComparisonError, match="at least two reports"):
        compare(reports(root, main="main"), tmp_path)
    with pytest.raises(ComparisonError, match="not an evaluation report"):
        load_report(data_dir / "manifest.json")


def test_cli_takes_named_reports_or_evaluation_folders(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, _ = runs
    assert cli_main(["compare", "--report", f"main={root / 'main' / 'report.json'}",
                     "--report", f"pretrained={root / 'pretrained'}", "--out", str(tmp_path / "a")]) == 0
    assert STAND_IN in capsys.readouterr().out
    assert cli_main(["compare", str(root / "pretrained"), str(root / "main"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "comparison.md").read_text() == (tmp_path / "b" / "comparison.md").read_text()
    capsys.readouterr()
    assert cli_main(["compare", str(root / "main"), "--report", f"main={root / 'main'}",
                     "--out", str(tmp_path / "c")]) == 1
    assert "ComparisonError: two reports for variant 'main'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compare_step_logs_to_the_pipeline_run(runs, tmp_path, mlflow_server):
    root, _ = runs
    tracking = TrackingConfig(tracking_uri=mlflow_server.uri, experiment=f"test-{uuid.uuid4().hex[:8]}",
                              request_timeout_s=5, max_retries=1, system_metrics_interval_s=None)
    pipeline_run_id = f"cmp-{uuid.uuid4().hex[:8]}"
    compare_step({"main": root / "main", "pretrained": root / "pretrained"}, tmp_path, tracking, pipeline_run_id)
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    found = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'")
    step = next(run for run in found if run.data.tags.get(TAG_STEP) == "compare")
    assert step.data.tags["mlflow.parentRunId"] in {run.info.run_id for run in found}
    main = load_report(root / "main").aggregate["model"]["synthesized"]["psnr_db"]
    pretrained = load_report(root / "pretrained").aggregate["model"]["synthesized"]["psnr_db"]
    metrics = step.data.metrics
    assert metrics["compare/pretrained_minus_main/synthesized/psnr_db"] == pytest.approx(pretrained - main)
    assert metrics["compare/linear/synthesized/psnr_db"] == pytest.approx(main, abs=1e-3)
    artifacts = {a.path for a in client.list_artifacts(step.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.html"}


def test_compare_op_writes_markdown_and_html_outputs(runs, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, _ = runs
    spec = compare_op.component_spec
    assert (spec.outputs["markdown"].type, spec.outputs["html"].type) == ("system.Markdown@0.0.1",
                                                                          "system.HTML@0.0.1")
    markdown, html = Markdown(uri=str(tmp_path / "table.md")), HTML(uri=str(tmp_path / "table.html"))
    compare_op.python_func(config_json="{}", workspace_root=str(tmp_path / "workspace"), pipeline_run_id="op-test",
                           main_report=Artifact(uri=str(root / "main")),
                           pretrained_report=Artifact(uri=str(root / "pretrained")),
                           comparison=Artifact(uri=str(tmp_path / "comparison")), markdown=markdown, html=html)
    assert (tmp_path / "table.md").read_text() == (tmp_path / "comparison" / "comparison.md").read_text()
    assert STAND_IN in (tmp_path / "table.html").read_text()
    worked_in = run_workspace(tmp_path / "workspace", "op-test") / "compare"
    assert (worked_in / "comparison.md").read_text() == (tmp_path / "table.md").read_text()


def test_compare_ops_journal_from_while_the_server_was_away_is_uploaded_by_finish_run(runs, mlflow_server, tmp_path,
                                                                                     monkeypatch):
    """On a cluster the step's pod and the exit handler's share only the workspace volume: the compare component
    keeps its MLflow journal (and the files it names) in the run's workspace folder, not in its output artifact,
    and finish-run uploads it once the server is back."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: trackers set the HTTP ones process-wide
    root, _ = runs
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    config_json = evaluation_config(f"tracking.tracking_uri={mlflow_server.uri}", f"tracking.experiment={experiment}",
                                    "tracking.request_timeout_s=2", "tracking.max_retries=1",
                                    "tracking.system_metrics_interval_s=null").model_dump_json()
    workspace, pipeline_run_id = tmp_path / "workspace", new_pipeline_run_id()
    comparison = tmp_path / "comparison"
    mlflow_server.stop()
    try:
        compare_op.python_func(config_json=config_json, workspace_root=str(workspace),
                               pipeline_run_id=pipeline_run_id, main_report=Artifact(uri=str(root / "main")),
                               pretrained_report=Artifact(uri=str(root / "pretrained")),
                               comparison=Artifact(uri=str(comparison)),
                               markdown=Markdown(uri=str(tmp_path / "table.md")),
                               html=HTML(uri=str(tmp_path / "table.html")))
    finally:
        mlflow_server.start()
    run_dir = run_workspace(workspace, pipeline_run_id)
    (journal,) = run_dir.rglob("mlflow-pending-*.json")
    assert journal.parent == run_dir / "compare"
    assert sorted(path.name for path in comparison.iterdir()) == ["comparison.html", "comparison.md"]

    finish_run_op.python_func(config_json=config_json, workspace_root=str(workspace), pipeline_run_id=pipeline_run_id,
                              scratch_cleanup="never",
                              status=PipelineTaskFinalStatus(state="SUCCEEDED", pipeline_job_resource_name="",
                                                             pipeline_task_name="", error_code=0, error_message=""))
    assert not journal.exists()
    client = MlflowClient(mlflow_server.uri)
    runs_of_experiment = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    step = next(run for run in runs_of_experiment if run.data.tags.get(TAG_STEP) == "compare")
    parent = client.get_run(step.data.tags["mlflow.parentRunId"])
    assert (step.info.status, parent.info.status) == ("FINISHED", "FINISHED")
    main = load_report(root / "main").aggregate["model"]["synthesized"]["psnr_db"]
    assert step.data.metrics["compare/main/synthesized/psnr_db"] == pytest.approx(main)
    artifacts = {a.path for a in client.list_artifacts(step.info.run_id, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.html"}
