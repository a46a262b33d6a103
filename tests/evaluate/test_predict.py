"""`ctv2v predict`: a trained model on a new thick series (real demo CT), NIfTI and DICOM out, clear refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctv2v.data.readers import dicom_series_files, read_volume
from ctv2v.files import output_set
from ctv2v.evaluate.evaluate import write_prediction_nifti
from ctv2v.evaluate.predict import Predictor, predict_file
from pipeline.cli import main as cli_main
from tests.tiny_model import SMALL_SERIES_SLICES, small_demo_series, tiny_model

FACTOR = 4
"""configs/smoke.yaml's thick factor, the tiny model's."""


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, demo_dir):
    """`ctv2v predict` of the small demo DICOM series with the tiny model, NIfTI and DICOM out."""
    root = tmp_path_factory.mktemp("predict")
    model_dir = tiny_model(root / "model")
    series = small_demo_series(demo_dir, root / "thick-dicom")
    command = ["predict", "--model", str(model_dir), "--input", str(series), "--out", str(root / "thin.nii.gz"),
               "--out-dicom", str(root / "thin-dicom"), "--device", "cpu"]
    assert cli_main(command) == 0
    return root, model_dir, series


def test_thin_nifti_keeps_the_input_origin_and_orientation_with_the_thin_spacing(predicted):
    root, _, series = predicted
    thick = read_volume(series)
    thin = read_volume(root / "thin.nii.gz")
    expected_slices = (SMALL_SERIES_SLICES - 1) * FACTOR + 1
    assert thin.array.shape == (expected_slices, *thick.array.shape[1:])
    assert thin.spacing == pytest.approx((thick.spacing[0] / FACTOR, *thick.spacing[1:]))
    assert np.allclose(thin.affine[:3, 3], thick.affine[:3, 3])  # thin slice 0 lies on thick slice 0
    assert np.allclose(thin.affine[:3, 0] * FACTOR, thick.affine[:3, 0])
    assert np.allclose(thin.affine[:3, 1:3], thick.affine[:3, 1:3])
    assert nib.load(root / "thin.nii.gz").header.get_zooms() == pytest.approx(
        (thick.spacing[0] / FACTOR, *thick.spacing[1:]))
    assert np.isfinite(thin.array).all()


def test_out_dicom_is_a_new_thin_series_read_back_with_the_same_shape_and_spacing(predicted):
    root, _, series = predicted
    nifti = read_volume(root / "thin.nii.gz")
    dicom = read_volume(root / "thin-dicom")
    assert dicom.array.shape == nifti.array.shape
    assert dicom.spacing == pytest.approx(nifti.spacing)
    assert np.allclose(dicom.affine, nifti.affine, atol=1e-4)
    assert np.abs(dicom.array - nifti.array).max() <= 0.5  # stored as whole HU
    source = pydicom.dcmread(dicom_series_files(series)[0], stop_before_pixels=True)
    written = [pydicom.dcmread(path, stop_before_pixels=True) for path in dicom_series_files(root / "thin-dicom")]
    assert len({ds.SeriesInstanceUID for ds in written}) == 1
    assert written[0].SeriesInstanceUID != source.SeriesInstanceUID
    assert written[0].StudyInstanceUID == source.StudyInstanceUID
    assert written[0].PatientID == source.PatientID
    assert float(written[0].SliceThickness) == pytest.approx(nifti.spacing[0])
    assert written[0].Modality == "CT"


def test_predict_equals_the_same_call_again(predicted, tmp_path):
    root, model_dir, series = predicted
    assert cli_main(["predict", "--model", str(model_dir), "--input", str(series), "--out",
                     str(tmp_path / "again.nii.gz"), "--device", "cpu"]) == 0
    assert np.array_equal(read_volume(tmp_path / "again.nii.gz").array, read_volume(root / "thin.nii.gz").array)


def _nifti(path, hu: np.ndarray, slice_spacing: float) -> None:
    # NIfTI axes (x, y, z): slices along z.
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.diag([1.0, 1.0, slice_spacing, 1.0])), path)


@pytest.mark.parametrize(("values", "slice_spacing", "arguments", "message"), [
    ("ct", 5.0, [], "input.nii.gz: slice spacing 5 mm does not fit this model, trained on thick slices 2-2 mm apart"),
    ("mr", 2.0, [], "input.nii.gz: lowest value"),
    ("ct", 2.0, ["--factor", "2"], "--factor 2: this model was trained to put 4 thin slices on each thick slice"),
])
def test_inputs_the_model_cannot_take_are_one_clear_error_and_write_nothing(predicted, tmp_path, capsys, values,
                                                                           slice_spacing, arguments, message):
    _, model_dir, _ = predicted
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, (16, 16, 4)) if values == "ct" else rng.uniform(0, 800, (16, 16, 4))
    _nifti(tmp_path / "input.nii.gz", hu, slice_spacing)
    out = tmp_path / "thin.nii.gz"
    code = cli_main(["predict", "--model", str(model_dir), "--input", str(tmp_path / "input.nii.gz"),
                     "--out", str(out), "--device", "cpu", *arguments])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err
    assert err.count("ctv2v: error:") == 1
    assert not out.exists()


def test_existing_dicom_folder_is_refused_and_left_as_it_was(predicted, tmp_path, capsys):
    _, model_dir, series = predicted
    existing = tmp_path / "viewer-folder"
    existing.mkdir()
    (existing / "mine.dcm").write_bytes(b"user data")
    code = cli_main(["predict", "--model", str(model_dir), "--input", str(series), "--out",
                     str(tmp_path / "thin.nii.gz"), "--out-dicom", str(existing), "--device", "cpu"])
    assert code == 1
    assert f"--out-dicom {existing}: folder exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["mine.dcm"]
    assert (existing / "mine.dcm").read_bytes() == b"user data"


def test_a_model_folder_without_its_training_spacing_is_refused(tmp_path, capsys, demo_dir):
    model_dir = tiny_model(tmp_path / "model")
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["thick_spacing_mm"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    code = cli_main(["predict", "--model", str(model_dir), "--input", str(demo_dir / "example_ct_sm.nii.gz"),
                     "--out", str(tmp_path / "thin.nii.gz")])
    assert code == 1
    assert "records no thick_spacing_mm" in capsys.readouterr().err


def test_overwrite_replaces_a_previous_prediction_and_its_dicom_series(predicted, tmp_path, capsys):
    root, model_dir, series = predicted
    out, out_dicom = tmp_path / "thin.nii.gz", tmp_path / "thin-dicom"
    shutil.copyfile(root / "thin.nii.gz", out)
    shutil.copytree(root / "thin-dicom", out_dicom)  # an earlier `predict --out-dicom`, ctv2v's marker included
    old_uid = pydicom.dcmread(dicom_series_files(out_dicom)[0], stop_before_pixels=True).SeriesInstanceUID
    command = ["predict", "--model", str(model_dir), "--input", str(series), "--out", str(out), "--out-dicom",
               str(out_dicom), "--device", "cpu"]
    assert cli_main(command) == 1
    assert f"--out {out}: exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert cli_main([*command, "--overwrite"]) == 0
    files = dicom_series_files(out_dicom)
    assert {pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID for path in files} == {
        json.loads(capsys.readouterr().out)["series_instance_uid"]} != {old_uid}
    assert sorted(p.name for p in out_dicom.iterdir()) == sorted([*(p.name for p in files), ".ctv2v-created"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thin-dicom", "thin.nii.gz"]  # nothing staged is left


def test_a_failure_writing_the_second_output_leaves_no_first_output(tmp_path):
    first, second = tmp_path / "thin.nii.gz", tmp_path / "thin-dicom"
    first.write_bytes(b"an earlier result")  # replaced only once both new outputs are written
    with pytest.raises(OSError, match="disk full"):
        with output_set([first, second]) as (new_first, new_second):
            new_first.write_bytes(b"new")
            new_second.mkdir()
            raise OSError("disk full")
    assert first.read_bytes() == b"an earlier result" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thin.nii.gz"]


def test_a_failure_renaming_the_second_output_puts_the_first_back(tmp_path, monkeypatch):
    first, second = tmp_path / "thin.nii.gz", tmp_path / "thin-dicom"
    first.write_bytes(b"an earlier result")
    rename = os.rename

    def rename_refusing_the_second(source, target):
        if Path(target) == second:
            raise OSError("cannot rename")
        rename(source, target)

    monkeypatch.setattr(os, "rename", rename_refusing_the_second)
    with pytest.raises(OSError, match="cannot rename"):
        with output_set([first, second]) as (new_first, new_second):
            new_first.write_bytes(b"new")
            new_second.mkdir()
    assert first.read_bytes() == b"an earlier result" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thin.nii.gz"]


def test_the_same_scan_at_two_pixel_spacings_gives_the_same_result_on_the_model_grid(tmp_path, demo_dir):
    series = read_volume(small_demo_series(demo_dir, tmp_path / "thick-dicom"))
    pixel_mm = float(series.spacing[1])
    predictor = Predictor(tiny_model(tmp_path / "model", f"data.resample.pixel_mm={pixel_mm}"), "cpu")
    # The same scan with every pixel split in 2 x 2: half the spacing, the same anatomy.
    fine_hu = np.repeat(np.repeat(series.array, 2, axis=1), 2, axis=2)
    fine_spacing = (series.spacing[0], pixel_mm / 2, pixel_mm / 2)
    on_model_grid, _ = predictor.predict_on_model_grid(series.array, series.spacing)
    fine_on_model_grid, _ = predictor.predict_on_model_grid(fine_hu, fine_spacing)
    np.testing.assert_allclose(fine_on_model_grid, on_model_grid, atol=1e-3)
    coarse = predictor.predict(series.array, series.spacing)
    fine_affine = series.affine.copy()
    fine_affine[:3, 1:3] /= 2
    write_prediction_nifti(tmp_path / "fine.nii.gz", fine_hu, fine_affine)
    assert read_volume(tmp_path / "fine.nii.gz").spacing == pytest.approx(fine_spacing)
    summary = predict_file(predictor, tmp_path / "fine.nii.gz", tmp_path / "thin.nii.gz")
    fine = read_volume(tmp_path / "thin.nii.gz")
    assert summary["model_grid_mm"] == pytest.approx([series.spacing[0] / FACTOR, pixel_mm, pixel_mm])
    assert coarse.model_grid_mm == pytest.approx((series.spacing[0] / FACTOR, pixel_mm, pixel_mm))
    assert fine.array.shape == (coarse.hu.shape[0], *fine_hu.shape[1:])
    assert fine.spacing == pytest.approx((series.spacing[0] / FACTOR, pixel_mm / 2, pixel_mm / 2))
    assert np.isfinite(fine.array).all()


def test_the_nifti_and_dicom_outputs_name_the_grid_the_model_ran_on(predicted):
    root, _, _ = predicted
    thin = read_volume(root / "thin.nii.gz")
    expected = f"ctv2v x{FACTOR}, model grid {thin.spacing[0]:g}x{thin.spacing[1]:g}x{thin.spacing[2]:g} mm"
    assert nib.load(root / "thin.nii.gz").header["descrip"].item().decode() == expected
    first = pydicom.dcmread(dicom_series_files(root / "thin-dicom")[0], stop_before_pixels=True)
    assert first.ImageComments == expected


def test_predict_adapt_fine_tunes_on_the_scan_and_says_so(tmp_path, demo_dir):
    series = small_demo_series(demo_dir, tmp_path / "thick-dicom")
    model_dir = tiny_model(tmp_path / "model", "evaluation.adapt.steps=2", "evaluation.adapt.batch_size=1")
    out = tmp_path / "thin.nii.gz"
    assert cli_main(["predict", "--model", str(model_dir), "--input", str(series), "--out", str(out),
                     "--device", "cpu", "--adapt", "600"]) == 0
    assert "adapted to this scan for 600 s" in nib.load(out).header["descrip"].tobytes().decode()
    plain = Predictor(model_dir, "cpu")
    adapted = Predictor(model_dir, "cpu", adapt_seconds=600.0)
    volume = read_volume(series)
    assert not np.array_equal(plain.predict(volume.array, volume.spacing).hu,
                              adapted.predict(volume.array, volume.spacing).hu)
    assert adapted.adaptation is not None and adapted.adaptation.steps == 2 and plain.adaptation is None


def test_the_cpu_layout_of_the_vae_does_not_change_the_prediction(tmp_path, demo_dir):
    """On CPU the VAE predicts in channels_last_3d (faster); the thin series is the default layout's."""
    series = read_volume(small_demo_series(demo_dir, tmp_path / "thick-dicom"))
    predictor = Predictor(tiny_model(tmp_path / "model"), "cpu")
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d)
               for p in predictor.model.vae.parameters() if p.dim() == 5)
    fast = predictor.predict(series.array, series.spacing).hu
    predictor.model.vae.to(memory_format=torch.contiguous_format)
    default = predictor.predict(series.array, series.spacing).hu
    np.testing.assert_allclose(fast, default, atol=0.5)


def test_predict_adapt_trains_on_the_models_own_prediction(tmp_path, demo_dir, monkeypatch):
    """The scan's z axis in the adaptation's training views comes from the model, not from the interpolation."""
    from ctv2v.data.interpolation import Interpolation
    from ctv2v.data.thick import project_to_thick
    from ctv2v.evaluate import predict as predict_module

    series = read_volume(small_demo_series(demo_dir, tmp_path / "thick-dicom"))
    model_dir = tiny_model(tmp_path / "model", "evaluation.adapt.steps=1", "evaluation.adapt.batch_size=1",
                           "evaluation.data_consistency=true")
    plain = Predictor(model_dir, "cpu")
    own, thick = plain.predict_on_model_grid(series.array, series.spacing)
    own = project_to_thick(own, thick, own.shape[0])
    config = plain.config
    interpolated = predict_module._interpolated(
        Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation), thick)
    assert config.evaluation.data_consistency and np.abs(own - interpolated[:own.shape[0]]).max() > 1.0
    trained_on = []
    real_adapt = predict_module.adapt_to_scan

    def recording_adapt(model, volume, predicted_hu, *args):
        trained_on.append(predicted_hu)
        return real_adapt(model, volume, predicted_hu, *args)

    monkeypatch.setattr(predict_module, "adapt_to_scan", recording_adapt)
    Predictor(model_dir, "cpu", adapt_seconds=600.0).predict(series.array, series.spacing)
    assert len(trained_on) == 1
    np.testing.assert_allclose(trained_on[0], own, rtol=0, atol=1e-3)
