"""The evaluate step: tiled whole-volume prediction, scores next to the baselines, NIfTI/panel/report outputs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ctv2v.data.interpolation import interpolate
from ctv2v.models.artifacts import save_trained_model
from ctv2v.data.cache import PreprocessCache
from ctv2v.data.clips import Tile, covering_tiles, eval_tiles
from ctv2v.data.readers import read_volume
from ctv2v.evaluate.evaluate import (MODEL, REPORT_FILE, EvaluationError, EvaluationReport, attends,
                                    manifest_sha256, plan_tiles, tile_weights)
from ctv2v.evaluate.metrics import METRIC_NAMES, SLICE_SETS, from_json
from ctv2v.models.v2v import build_model
from ctv2v.tracking.tags import TAG_PHASE, TAG_STEP, TAG_TEST_PSNR, TAG_VARIANT, TAG_WEIGHTS
from ctv2v.evaluate.panels import COLUMN_WIDTH_PX, render_panel
from ctv2v.data.prepared import DATASET_DIR, MANIFEST_FILE, PREPROCESS_CACHE_DIR
from ctv2v.models.vae import build_untrained_vae
from tests.conftest import (EVALUATION_OVERRIDES, EVALUATION_PHANTOM, REPO, LinearInterpolationSampler,
                            evaluation_config, prepared_phantoms, run_evaluate)


class NaNSampler(LinearInterpolationSampler):
    """TEST-ONLY: a model whose samples contain a NaN (as a diverged fp16 sampler would produce)."""

    interpolation = None
    """Samples from the thick clip alone (no interpolated clip needed)."""

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        out = super().sample(thick, steps, generator)
        out[0, 0, 1, 2, 3] = float("nan")
        return out


IN_PLANE_TILES = ("evaluation.tile_height=16", "evaluation.tile_width=16")


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """The linear stand-in evaluated on two synthetic volumes (slab-average x4 thick series)."""
    root = tmp_path_factory.mktemp("linear")
    # Tiles smaller than the slices, so in-plane blending is part of what is checked.
    config = evaluation_config(*IN_PLANE_TILES)
    data_dir = prepared_phantoms(root / "data", config, volumes=2, shape=EVALUATION_PHANTOM)
    out_dir = root / "eval"
    report = run_evaluate(LinearInterpolationSampler(config.data.thick.factor), data_dir, config, out_dir)
    return config, data_dir, out_dir, report


def test_blended_tiles_of_a_linear_model_reproduce_the_linear_baseline(linear_run):
    config, data_dir, out_dir, report = linear_run
    assert report.n_volumes == 2
    for volume in report.volumes:
        scores = volume.metrics
        for subset in SLICE_SETS:
            for name in METRIC_NAMES:
                assert scores[MODEL][subset][name] == pytest.approx(scores["linear"][subset][name], rel=1e-5,
                                                                    abs=1e-4), (volume.id, subset, name)
        # The check can fail: nearest and cubic score differently on the same slices.
        assert scores["nearest"]["synthesized"]["psnr_db"] < scores["linear"]["synthesized"]["psnr_db"] - 0.5
        # Voxel by voxel too: every covered slice comes from interpolating tiles only.
        volume_data = PreprocessCache(data_dir / PREPROCESS_CACHE_DIR).load(
            data_dir / DATASET_DIR, _manifest_entry(data_dir, volume.id), config.data)
        linear = interpolate(volume_data.thick, volume_data.thin.shape[0], "linear")[:volume.scored_slices]
        predicted = np.asarray(nib.load(out_dir / volume.prediction_nifti).dataobj)
        assert np.abs(predicted - linear).max() < 0.05


def _manifest_entry(data_dir: Path, volume_id: str) -> dict:
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    return next(entry for entry in manifest["volumes"] if entry["id"] == volume_id)


def test_tile_weights_vanish_after_the_last_thick_slice_and_taper_smoothly():
    tile = Tile(z0=8, y0=0, x0=0, frames=16, height=12, width=12, factor=4)
    weights = tile_weights(tile, n_thick=100)
    profile = weights[:, 6, 6]
    assert np.all(profile[:13] > 0) and np.all(profile[13:] == 0)  # thick frames at 0, 4, 8, 12
    assert profile.argmax() == 6 and profile[0] < 0.2 * profile[6]
    assert weights[6, 0, 6] < 0.2 * weights[6, 6, 6]
    # A tile reaching past the series' last thick slice stops interpolating at it.
    last = tile_weights(tile, n_thick=4)  # thick slices of this tile: 2 and 3 exist
    assert np.all(last[:5, 6, 6] > 0) and np.all(last[5:, 6, 6] == 0)


def test_tiles_cover_every_scored_slice_with_positive_weight(linear_run):
    config, data_dir, _, report = linear_run
    for volume in report.volumes:
        n_thick, k = volume.n_thick, config.data.thick.factor
        shape = tuple(volume.thin_shape)
        total = np.zeros(volume.scored_slices)
        plan = plan_tiles(LinearInterpolationSampler(k), config, shape, k, torch.device("cpu"), n_thick)
        assert plan.size[1:] == (16, 16) and plan.size[1] < shape[1]
        for tile in covering_tiles(shape, plan.size, plan.strides, k, n_thick):
            z = tile_weights(tile, n_thick)[:, tile.height // 2, tile.width // 2]
            stop = min(tile.z0 + tile.frames, len(total))
            total[tile.z0:stop] += z[:stop - tile.z0]
        assert np.all(total > 0)


def test_prediction_nifti_keeps_the_thin_geometry(linear_run):
    config, data_dir, out_dir, report = linear_run
    volume = report.volumes[0]
    source = read_volume(data_dir / DATASET_DIR / _manifest_entry(data_dir, volume.id)["path"])
    written = nib.load(out_dir / volume.prediction_nifti)
    assert written.shape == (volume.scored_slices, *source.array.shape[1:])
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(written.header.get_zooms(), source.spacing, atol=1e-5)
    assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
    # Every predicted voxel sits at the world position of a source voxel: map a few through both affines.
    original = nib.load(data_dir / DATASET_DIR / _manifest_entry(data_dir, volume.id)["path"])
    for index in [(0, 0, 0), (4, 5, 6), (volume.scored_slices - 1, 20, 11)]:
        world = written.affine @ [*index, 1]
        source_index = np.linalg.solve(original.affine, world)[:3]
        np.testing.assert_allclose(source_index, np.round(source_index), atol=1e-4)
    # Thick slice j sits on thin slice j*k: at those slices (slab centres) the prediction is the thick slice.
    thick_positions = np.arange(volume.n_thick) * config.data.thick.factor
    cache = PreprocessCache(data_dir / PREPROCESS_CACHE_DIR)
    entry = _manifest_entry(data_dir, volume.id)
    thick = cache.load(data_dir / DATASET_DIR, entry, config.data).thick.array
    np.testing.assert_allclose(np.asarray(written.dataobj)[thick_positions], thick, atol=0.05)


def test_subsampled_thick_series_puts_true_slices_back_at_their_world_positions(tmp_path):
    config = evaluation_config("data.thick.method=subsample", "evaluation.max_volumes=1")
    data_dir = prepared_phantoms(tmp_path / "data", config, volumes=1, shape=EVALUATION_PHANTOM)
    report = run_evaluate(LinearInterpolationSampler(4), data_dir, config, tmp_path / "eval")
    volume = report.volumes[0]
    original = nib.load(data_dir / DATASET_DIR / "vol0.nii.gz")
    source = np.asarray(original.dataobj)
    written = nib.load(tmp_path / "eval" / volume.prediction_nifti)
    predicted = np.asarray(written.dataobj)
    for index in np.ndindex(predicted.shape):
        if index[0] % 4 or index[1] % 7 or index[2] % 5:
            continue
        world = written.affine @ [*index, 1]
        i, j, k = np.round(np.linalg.solve(original.affine, world)[:3]).astype(int)
        assert predicted[index] == pytest.approx(source[i, j, k], abs=0.05), index


class StepsRecordingSampler(LinearInterpolationSampler):
    """TEST-ONLY: the linear stand-in, recording the sampling steps it is asked for."""

    def __init__(self, factor: int):
        super().__init__(factor)
        self.steps: list[int] = []

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self.steps.append(steps)
        return super().sample(thick, steps, generator)


def test_report_states_settings_and_limits_volumes(tmp_path, linear_run):
    config, data_dir, out_dir, report = linear_run
    written = from_json((out_dir / REPORT_FILE).read_text())
    assert written == report.to_dict() and EvaluationReport.from_dict(written) == report
    assert written["hu_range"] == [-1000.0, 1000.0]
    assert written["thick"] == {"method": "slab_average", "factor": 4, "thickness_mm": None}
    assert written["volumes"][0]["thick_description"] == "slab average over 5 mm every 5 mm (x4 of the thin spacing)"
    assert written["sample_steps"] == 2 and written["variant"] == "main"
    assert written["weights"] == "scratch" and "warning" not in written
    assert written["test_volumes_in_split"] == 2 and written["volume_ids"] == ["vol0", "vol1"]
    assert written["manifest_sha256"] == manifest_sha256(json.loads((data_dir / MANIFEST_FILE).read_text()))
    for subset in SLICE_SETS:
        mean = np.mean([v["metrics"]["linear"][subset]["psnr_db"] for v in written["volumes"]])
        assert written["aggregate"]["linear"][subset]["psnr_db"] == pytest.approx(mean)

    # No evaluation.sample_steps: evaluation samples with the model's diffusion.sample_steps.
    limited = evaluation_config("evaluation.max_volumes=1", "evaluation.hu_min=-500", "evaluation.sample_steps=null",
                                "diffusion.sample_steps=3")
    sampler = StepsRecordingSampler(4)
    stand_in = run_evaluate(sampler, data_dir, limited, tmp_path / "eval", weights_label="stand-in")
    assert stand_in.n_volumes == 1 and stand_in.test_volumes_in_split == 2
    assert stand_in.hu_range == [-500.0, 1000.0] and stand_in.sample_steps == 3 and set(sampler.steps) == {3}
    assert stand_in.weights == "stand-in" and "STAND-IN" in stand_in.warning
    assert stand_in.weights_display == "stand-in (random MAISI-layout weights)"


def test_panel_is_written_per_volume_with_what_the_model_changed(linear_run):
    _, _, out_dir, report = linear_run
    for volume in report.volumes:
        image = Image.open(out_dir / volume.panel_png)
        # thick input, model, linear, truth, the model's start, |model - truth|, |model - start|
        assert image.format == "PNG" and image.width == 6 + 7 * (COLUMN_WIDTH_PX + 6)


def test_panel_height_follows_the_slice_spacing():
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 1000, size=(20, 12, 32)).astype(np.float32)

    def height(slice_mm: float) -> int:
        return render_panel(thick_nearest_hu=volume, model_hu=volume, linear_hu=volume, target_hu=volume,
                            spacing_mm=(slice_mm, 1.0, 1.0), hu_min=-1000, hu_max=1000, plane="coronal",
                            title_lines=["t"]).height

    # 20 slices over 32 columns of 1 mm: each extra mm of slice spacing adds 20 mm = 20 * 256 / 32 pixels.
    assert height(3.0) - height(1.0) == 2 * 20 * COLUMN_WIDTH_PX // 32


def test_panel_error_map_is_black_where_the_model_is_right():
    truth = np.full((16, 8, 8), 100.0, dtype=np.float32)
    model = truth.copy()
    model[8:] += 500.0  # the superior half is wrong by 500 HU (the error map's white point)
    image = render_panel(thick_nearest_hu=truth, model_hu=model, linear_hu=truth, target_hu=truth,
                         spacing_mm=(1.0, 1.0, 1.0), hu_min=-1000, hu_max=1000, plane="sagittal", title_lines=[])
    error_column = np.asarray(image)[:, 6 + 4 * (COLUMN_WIDTH_PX + 6) + COLUMN_WIDTH_PX // 2]
    strip = error_column[-6 - 16 * COLUMN_WIDTH_PX // 8:-6]
    # Superior at the top: the wrong half is the upper one and saturates to white, the right half is black.
    assert (strip[: len(strip) // 2] == 255).all() and (strip[len(strip) // 2:] == 0).all()


def test_nan_prediction_is_an_error_naming_the_volume(tmp_path):
    config = evaluation_config("evaluation.max_volumes=1")
    data_dir = prepared_phantoms(tmp_path / "data", config, volumes=1, shape=EVALUATION_PHANTOM)
    with pytest.raises(EvaluationError, match=r"volume vol0: .*NaN"):
        run_evaluate(NaNSampler(4), data_dir, config, tmp_path / "eval")
    assert not (tmp_path / "eval" / REPORT_FILE).exists()


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    """A train-step output folder (model/ inside) holding a tiny untrained model, and one-volume data for it."""
    root = tmp_path_factory.mktemp("untrained")
    config = evaluation_config("evaluation.max_volumes=1")
    data_dir = prepared_phantoms(root / "data", config, volumes=1, shape=(24, 24, 24))
    torch.manual_seed(0)
    vae = build_untrained_vae(config)
    # A random-initialised scratch VAE stands in for a trained one: these tests check plumbing, not quality.
    vae.weights_label = "scratch"
    # Phantom slices are 1.25 mm apart, x4: thick slices 5 mm apart.
    save_trained_model(build_model(config, vae), root / "train" / "model", config, None, phase="frozen",
                       thick_spacing_mm=(5.0, 5.0))
    return data_dir, root / "train"


def test_evaluate_command_runs_a_tiny_untrained_model_and_tracks_it(untrained_model, tmp_path, mlflow_server,
                                                                     capsys):
    from mlflow import MlflowClient

    from pipeline.cli import main as cli_main

    data_dir, train_dir = untrained_model
    experiment = f"test-{uuid.uuid4().hex[:8]}"
    overrides = [*EVALUATION_OVERRIDES, "evaluation.max_volumes=1", f"tracking.tracking_uri={mlflow_server.uri}",
                 f"tracking.experiment={experiment}", "tracking.system_metrics_interval_s=null",
                 "evaluation.data_consistency=true"]
    command = ["evaluate", "--config", str(REPO / "configs" / "smoke.yaml"), *(f"--set={o}" for o in overrides),
               "--data", str(data_dir), "--model", str(train_dir / "model"), "--out", str(tmp_path / "eval")]
    assert cli_main(command) == 0
    report = json.loads((tmp_path / "eval" / REPORT_FILE).read_text())
    out = capsys.readouterr().out
    # MLflow prints "View run ..." links to stdout too; the command's summary is the JSON object after them.
    summary = json.loads(out[out.index("{\n"):])
    assert summary["mean"]["model"] == report["aggregate"][MODEL]["synthesized"]
    scores = report["volumes"][0]["metrics"][MODEL]
    assert all(np.isfinite(scores[s][m]) for s in SLICE_SETS for m in METRIC_NAMES)
    assert (tmp_path / "eval" / "report.html").read_text().count("main model") == 1
    assert (tmp_path / "eval" / "resolved-config.yaml").is_file()

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_STEP) == "evaluate")
    assert (run.data.tags[TAG_VARIANT], run.data.tags[TAG_PHASE], run.data.tags[TAG_WEIGHTS]) == (
        "main", "evaluate", "scratch")
    for method in ("model", "nearest", "linear", "cubic", "cubic+dc"):
        assert run.data.metrics[f"test/{method.replace('+', '_')}/synthesized/psnr_db"] == pytest.approx(
            report["aggregate"][method]["synthesized"]["psnr_db"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.json", "evaluation/report.html", "evaluation/panels"} <= artifacts
    predicted = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/predictions")}
    assert predicted == {f"evaluation/predictions/{volume_id}.nii.gz" for volume_id in report["volume_ids"]}
    version = client.get_model_version_by_alias("ctv2v-main", "candidate")
    assert version.run_id == run.info.run_id
    assert float(version.tags[TAG_TEST_PSNR]) == pytest.approx(report["aggregate"][MODEL]["synthesized"]["psnr_db"])


def test_evaluate_op_fills_its_kfp_outputs(untrained_model, tmp_path, monkeypatch):
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

    from components.evaluate import evaluate_op

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data_dir, train_dir = untrained_model
    outputs = {"metrics": Metrics(uri=str(tmp_path / "metrics")), "report": Artifact(uri=str(tmp_path / "report")),
               "report_html": HTML(uri=str(tmp_path / "report.html"))}
    data = Dataset(uri=str(data_dir / MANIFEST_FILE), metadata={"data_dir": str(data_dir)})
    # The pipeline passes one config to both branches and the variant separately.
    config_json = evaluation_config("evaluation.max_volumes=1", "variant=pretrained").model_dump_json()
    workspace = tmp_path / "workspace"
    with pytest.raises(ValueError, match=f"model artifact {tmp_path / 'elsewhere'}: metadata has no 'workspace_dir'"):
        evaluate_op.python_func(config_json=config_json, variant="main", workspace_root=str(workspace),
                                pipeline_run_id="op-test", data=data, model=Model(uri=str(tmp_path / "elsewhere")),
                                **outputs)
    # The train step's artifact names its folder on the workspace volume, where evaluate reads the model from.
    evaluate_op.python_func(config_json=config_json, variant="main", workspace_root=str(workspace),
                            pipeline_run_id="op-test", data=data,
                            model=Model(uri=str(tmp_path / "elsewhere"), metadata={"workspace_dir": str(train_dir)}),
                            **outputs)
    # The step works in the run's workspace folder (where finish-run finds its MLflow journal) and exports its
    # files into the artifact.
    worked_in = workspace / "runs" / "op-test" / "evaluate-main"
    assert (tmp_path / "report" / REPORT_FILE).read_text() == (worked_in / REPORT_FILE).read_text()
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == sorted(
        ["panels", "predictions", "report.html", "report.json", "resolved-config.yaml"])
    report = json.loads((tmp_path / "report" / REPORT_FILE).read_text())
    logged = outputs["metrics"].metadata
    assert logged["test_psnr_db_synthesized"] == report["aggregate"][MODEL]["synthesized"]["psnr_db"]
    assert logged["linear_all_mae_hu"] == report["aggregate"]["linear"]["all"]["mae_hu"]
    assert outputs["report"].metadata["weights"] == "VAE trained from scratch"
    assert "<h1>ctv2v evaluation: main [VAE trained from scratch]</h1>" in (tmp_path / "report.html").read_text()


def test_volume_ids_select_test_volumes_and_refuse_others():
    from ctv2v.evaluate.evaluate import EvaluationError, evaluation_entries

    manifest = {"volumes": [{"id": "a", "split": "test"}, {"id": "b", "split": "test"}, {"id": "c", "split": "train"}]}
    assert [e["id"] for e in evaluation_entries(manifest, None, ["b"])] == ["b"]
    assert [e["id"] for e in evaluation_entries(manifest, 1, None)] == ["a"]
    with pytest.raises(EvaluationError, match=r"\['c'\] are not in the test split"):
        evaluation_entries(manifest, None, ["c"])


CPU = torch.device("cpu")


def test_auto_tiles_are_whole_slices_without_attention_and_the_training_crop_with_it():
    config = evaluation_config("evaluation.tile_batch_size=auto")
    shape, k = (29, 43, 30), config.data.thick.factor
    plan = plan_tiles(LinearInterpolationSampler(k), config, shape, k, CPU)
    assert plan.size == (config.data.clip.frames, 43, 30)
    assert plan.strides[0] == config.data.clip.frames - k  # neighbours share one thick slice, the least possible
    assert 1 <= plan.batch_size <= len(covering_tiles(shape, plan.size, plan.strides, k))
    assert plan.batch_size * plan.tile_peak_bytes <= plan.budget_bytes
    # MONAI's DiffusionModelUNet has self-attention in its middle block whatever denoiser.attention_levels says.
    model = build_model(config, build_untrained_vae(config))
    assert attends(model) and not attends(LinearInterpolationSampler(k))
    plan = plan_tiles(model, config, shape, k, CPU)
    assert plan.size == (config.data.clip.frames, config.data.clip.height, config.data.clip.width)
    assert plan.tile_peak_bytes > 0


def test_a_small_memory_budget_shrinks_whole_slice_tiles_to_the_training_crop():
    config = evaluation_config("evaluation.tile_memory_share=1e-9", "evaluation.tile_batch_size=auto")
    k = config.data.thick.factor
    plan = plan_tiles(LinearInterpolationSampler(k), config, (29, 130, 70), k, CPU)
    assert plan.size == (config.data.clip.frames, config.data.clip.height, config.data.clip.width)
    assert plan.batch_size == 1


def test_fixed_tile_settings_cut_the_volume_as_the_training_crop_tiles_did():
    config = evaluation_config("evaluation.tile_frames=8", "evaluation.tile_height=16", "evaluation.tile_width=16",
                               "evaluation.tile_overlap=0.25", "evaluation.tile_batch_size=3")
    shape, k = (29, 43, 30), config.data.thick.factor
    plan = plan_tiles(LinearInterpolationSampler(k), config, shape, k, CPU)
    assert plan.tile_peak_bytes is None and plan.batch_size == 3
    assert covering_tiles(shape, plan.size, plan.strides, k) == eval_tiles(shape, config.data.clip, k)


@pytest.mark.parametrize(("override", "message"), [
    ("evaluation.tile_frames=6", "evaluation.tile_frames=6 must be a multiple of the thick factor 4"),
    ("evaluation.tile_frames=4", "hold at least 2 thick slices"),
])
def test_tile_frames_that_do_not_start_on_thick_slices_are_refused(override, message):
    config = evaluation_config(override)
    with pytest.raises(EvaluationError, match=message):
        plan_tiles(LinearInterpolationSampler(4), config, (29, 43, 30), 4, CPU)
