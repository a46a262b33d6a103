"""Hostile but fair inputs to the real `ctv2v` command line: each is refused with exit code 1 (2 for a config
error), ONE `ctv2v: error:` line naming the user's file or key, no traceback, and the user's data and the output
folder exactly as they were (byte for byte, mode included).

The commands run in-process through pipeline.cli.main (the console script's entry point): a subprocess costs
7-20 s of imports per case on a busy 2-core machine; test_console_script_prints_one_line_and_keeps_the_data
runs the installed `ctv2v` script itself once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctv2v.config import TrackingConfig
from ctv2v.tracking.runs import Tracker
from pipeline.cli import main
from tests.conftest import (
    REPO,
    TRAINING_OVERRIDES,
    TRAINING_PHANTOM,
    prepared_phantoms,
    smoke_config,
    write_phantom,
)
from tests.tiny_model import tiny_model

SMOKE = str(REPO / "configs" / "smoke.yaml")
PRETRAINED = str(REPO / "configs" / "pretrained.yaml")
FAST_REMOTE = ["storage.timeout_s=0.5", "storage.deadline_s=2"]
"""A dead server must fail an attempt in 0.5 s and the whole fetch in about 2 s (+ one attempt)."""


# ------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, tuple]:
    """`root` and every entry below it (links not followed): file sha256 + mode, link target, folder mode."""
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_symlink():
        return {".": ("link", os.readlink(root))}
    if root.is_file():
        return {".": ("file", hashlib.sha256(root.read_bytes()).hexdigest(), root.stat().st_mode)}
    entries = {".": ("dir", root.stat().st_mode)}
    for folder, subfolders, files in os.walk(root):
        for name in [*subfolders, *files]:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[rel] = ("dir", path.stat().st_mode)
            else:
                entries[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return entries


class Evil:
    """Unpickling this runs os.system: what a malicious `.pt` file does."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


class HungServer:
    """A loopback TCP server that accepts connections and never answers (nor closes them)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class TrickleServer:
    """A loopback HTTP server that answers any request with 200 and a 100 MB body it sends one byte every 0.05 s:
    never silent long enough for a read timeout, never done (a checkpoint URL, or an S3 endpoint to minio)."""

    INTERVAL_S = 0.05

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
                while True:
                    conn.sendall(b"x")
                    time.sleep(self.INTERVAL_S)
            except OSError:  # the client gave up and closed the connection
                return

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    """What the cases build on: a user's dataset, a good prepared folder, servers, a scratch folder."""

    tmp: Path
    dataset: Path
    """The user's dataset folder (3 small NIfTI phantoms)."""
    prepared: Path
    """A good prepared folder of `dataset`."""
    s3: object
    hung: HungServer
    model: Path
    """A tiny untrained trained-model folder (tests.tiny_model), trained on 2 mm thick slices."""
    thick: Path
    """A thick NIfTI series with 2 mm slices that the model accepts."""
    trickle: TrickleServer
    mlflow: Callable[[], object]
    """The session's MLflow server, started on first use."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """One bad input: how to build it, the command, what must be said, what must not change."""

    name: str
    build: Callable[[World], tuple[list[str], list[Path]]]
    """-> (argv, the paths that must stay unchanged besides the user's dataset and the prepared folder)."""
    code: int
    message: str
    """A regex the one error line must match; `{tmp}` is the case's scratch folder."""


# ------------------------------------------------------------------------------------------- builders
def _user_copy(world: World, name: str = "mydata") -> Path:
    return Path(shutil.copytree(world.dataset, world.tmp / name))


def _prepare(world: World, source: Path | str, *sets: str, out: Path | None = None) -> list[str]:
    out = out or world.tmp / "out"
    return ["prepare-data", "--config", SMOKE, "--set", f"data.source={source}",
            *[a for s in sets for a in ("--set", s)], "--out", str(out)]


def out_is_parent_of_source(world):  # item 1
    project = world.tmp / "proj"
    shutil.copytree(world.dataset, project / "dataset")
    return _prepare(world, project / "dataset", out=project), [project]


def rerun_with_bad_s3_key(world):  # item 2
    world.env.update(world.s3.env())
    return _prepare(world, "s3://ctv2v/no-such-prefix", f"storage.s3_endpoint={world.s3.url}",
                    out=world.prepared), []


def rerun_with_truncated_volume(world):  # item 2 + 11
    folder = _user_copy(world)
    data = (folder / "vol1.nii.gz").read_bytes()
    (folder / "vol1.nii.gz").write_bytes(data[: len(data) // 2])
    return _prepare(world, folder, out=world.prepared), [folder]


def s3_dataset_with_truncated_volume(world):  # item 11: the object is named, not the staged copy
    from minio import Minio

    client = Minio(world.s3.endpoint, world.s3.access_key, world.s3.secret_key, secure=False, region="us-east-1")
    for path in sorted(world.dataset.iterdir()):
        data = path.read_bytes()
        data = data[: len(data) // 2] if path.name == "vol1.nii.gz" else data
        client.put_object("ctv2v", f"datasets/{world.tmp.name}/{path.name}", io.BytesIO(data), len(data))
    world.env.update(world.s3.env())
    return _prepare(world, f"s3://ctv2v/datasets/{world.tmp.name}/"), []


def nan_block(world):  # item 5 + 11
    folder = _user_copy(world)
    image = nib.load(folder / "vol2.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[4:9, 4:9, 10:12] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), folder / "vol2.nii.gz")
    return _prepare(world, folder), [folder]


def all_nan(world):  # item 5
    folder = _user_copy(world)
    image = nib.load(folder / "vol0.nii.gz")
    nib.save(nib.Nifti1Image(np.full(image.shape, np.inf, np.float32), image.affine), folder / "vol0.nii.gz")
    return _prepare(world, folder), [folder]


def _dicom_dataset(world: World, demo_dir: Path) -> Path:
    folder = _user_copy(world, "withdicom")
    shutil.copytree(demo_dir / "example_ct_dicom", folder / "series")
    return folder


def _series_file(folder: Path, index: int) -> Path:
    return sorted((folder / "series").iterdir())[index]


def dicom_cut_in_pixels(world, demo_dir):  # item 6
    folder = _dicom_dataset(world, demo_dir)
    victim = _series_file(folder, 4)
    victim.write_bytes(victim.read_bytes()[:60_000])
    return _prepare(world, folder), [folder]


def dicom_random_bytes(world, demo_dir):
    folder = _dicom_dataset(world, demo_dir)
    (folder / "series" / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    return _prepare(world, folder), [folder]


def dicom_mixed_series(world, demo_dir):
    folder = _dicom_dataset(world, demo_dir)
    for path in sorted((folder / "series").iterdir())[:2]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.7"
        ds.save_as(path)
    return _prepare(world, folder), [folder]


def dicom_mr(world, demo_dir):
    folder = _dicom_dataset(world, demo_dir)
    ds = pydicom.dcmread(_series_file(folder, 3))
    ds.Modality = "MR"
    ds.save_as(_series_file(folder, 3))
    return _prepare(world, folder), [folder]


def dicom_missing_slice(world, demo_dir):
    folder = _dicom_dataset(world, demo_dir)
    by_z = sorted((folder / "series").iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[9].unlink()
    return _prepare(world, folder), [folder]


def empty_source(world):  # item 9
    return ["prepare-data", "--config", SMOKE, "--set", "data.source=", "--out", str(world.tmp / "out")], []


def empty_source_in_a_file(world):  # item 9: an empty string from a YAML file
    overlay = _checkpoint_file(world, "empty-source.yaml", b'data: {source: ""}\n')
    return ["prepare-data", "--config", SMOKE, "--config", str(overlay), "--out", str(world.tmp / "out")], [overlay]


def bool_as_epochs(world):  # item 8
    return ["prepare-data", "--config", SMOKE, "--set", "training.frozen.epochs=yes",
            "--out", str(world.tmp / "out")], []


def bool_as_checkpoint_every(world):  # item 8
    return ["prepare-data", "--config", SMOKE, "--set", "training.checkpoint_every_steps=true",
            "--out", str(world.tmp / "out")], []


def config_typo(world):
    return ["prepare-data", "--config", SMOKE, "--set", "data.clip.frame=8", "--out", str(world.tmp / "out")], []


def _checkpoint_file(world: World, name: str, content: bytes) -> Path:
    path = world.tmp / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _fetch(world: World, source: str, *sets: str, sha256: str = "0" * 64) -> list[str]:
    (world.tmp / "cache").mkdir()  # ctv2v's download cache (it keeps a staging folder): not a user's folder
    return ["fetch-checkpoint", "--source", source, "--sha256", sha256, "--cache-dir", str(world.tmp / "cache"),
            *[a for s in sets for a in ("--set", s)], "--out", str(world.tmp / "out")]


def wrong_hash(world):
    path = _checkpoint_file(world, "vae.pt", b"some weights")
    return _fetch(world, path.as_uri()), [path]


def dead_endpoint(world):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    return _fetch(world, f"http://127.0.0.1:{port}/vae.pt", *FAST_REMOTE), []


def hung_http(world):  # item 12
    return _fetch(world, f"http://127.0.0.1:{world.hung.port}/vae.pt", *FAST_REMOTE), []


def hung_https(world):  # item 12
    return _fetch(world, f"https://127.0.0.1:{world.hung.port}/vae.pt", *FAST_REMOTE), []


def hung_s3(world):  # item 12
    world.env.update(AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")
    return _fetch(world, "s3://ctv2v/vae.pt", *FAST_REMOTE,
                  f"storage.s3_endpoint=http://127.0.0.1:{world.hung.port}"), []


def s3_bad_key(world):
    world.env.update(world.s3.env())
    return _fetch(world, "s3://ctv2v/no/such/vae.pt", *FAST_REMOTE), []


def s3_wrong_secret(world):  # item 12: a 403 hints at credentials
    (world.s3.root / "ctv2v" / "weights").mkdir(parents=True, exist_ok=True)
    (world.s3.root / "ctv2v" / "weights" / "vae.pt").write_bytes(b"weights")
    world.env.update({**world.s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    return _fetch(world, "s3://ctv2v/weights/vae.pt", *FAST_REMOTE), []


def _match(world: World, checkpoint: Path) -> list[str]:
    return ["match", "--config", PRETRAINED, "--config", SMOKE, "--checkpoint", str(checkpoint),
            "--data", str(world.prepared), "--out", str(world.tmp / "out")]


def match_malicious_pickle(world):  # item 10: the blocked global is named
    path = world.tmp / "inputs" / "evil.pt"
    path.parent.mkdir(parents=True)
    torch.save({"encoder.weight": Evil()}, path)
    return _match(world, path), [path]


def match_malicious_plain_pickle(world):  # item 10: a pickle.dump file, protocol 4
    path = _checkpoint_file(world, "evil.pkl", pickle.dumps({"w": Evil()}, protocol=4))
    return _match(world, path), [path]


def match_truncated_checkpoint(world):
    saved = world.tmp / "inputs" / "whole.pt"
    saved.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1000)}, saved)
    path = _checkpoint_file(world, "cut.pt", saved.read_bytes()[:1500])
    return _match(world, path), [path]


def match_foreign_checkpoint(world):
    path = world.tmp / "inputs" / "unet.pt"
    path.parent.mkdir(parents=True)
    torch.save(torch.nn.Conv3d(1, 4, 3).state_dict(), path)
    return _match(world, path), [path]


def _scratch_vae(world: World) -> Path:
    from ctv2v.models.vae import ScratchVAE, save_vae_artifact

    config = smoke_config(*TRAINING_OVERRIDES)
    vae = ScratchVAE.from_config(config.vae.scratch)
    save_vae_artifact(vae, world.tmp / "inputs" / "vae", weights="scratch", extra={"note": "random test weights"})
    return world.tmp / "inputs" / "vae"


def resume_from_random_bytes(world):  # item 10: a resume checkpoint
    from ctv2v.files import claim_output_folder

    out = claim_output_folder(world.tmp / "out")  # a folder an earlier run made
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-00000004.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    return ["train-vae", "--config", SMOKE, *[a for s in TRAINING_OVERRIDES for a in ("--set", s)],
            "--data", str(world.prepared), "--out", str(out), "--resume"], []


def resume_from_malicious_pickle(world):  # item 10
    from ctv2v.files import claim_output_folder

    out = claim_output_folder(world.tmp / "out")  # a folder an earlier run made
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"format": Evil()}, out / "checkpoints" / "step-00000004.pt")
    return ["train-vae", "--config", SMOKE, *[a for s in TRAINING_OVERRIDES for a in ("--set", s)],
            "--data", str(world.prepared), "--out", str(out), "--resume"], []


def train_with_malicious_vae_weights(world):  # item 10: a VAE artifact whose weights are a malicious pickle
    vae = _scratch_vae(world)
    torch.save({"w": Evil()}, vae / "vae.pt")
    meta = json.loads((vae / "vae.json").read_text())
    meta["vae_pt_sha256"] = hashlib.sha256((vae / "vae.pt").read_bytes()).hexdigest()  # the hash matches
    (vae / "vae.json").write_text(json.dumps(meta))
    return ["train", "--phase", "frozen", "--config", SMOKE, *[a for s in TRAINING_OVERRIDES for a in ("--set", s)],
            "--data", str(world.prepared), "--vae", str(vae), "--out", str(world.tmp / "out")], [vae]


# ------------------------------------------------------------ issue 20: outputs the user owns, absurd settings
def _prepared_copy(world: World) -> Path:
    """A prepared folder of the user's (a copy of the good one, ctv2v's marker included), to add files to."""
    return Path(shutil.copytree(world.prepared, world.tmp / "P", symlinks=True))


def prepare_rerun_with_user_files(world):  # issue 20 item 1
    folder = _prepared_copy(world)
    (folder / "notes.txt").write_text("my notes")
    (folder / "myresults").mkdir()
    (folder / "myresults" / "r.txt").write_text("0.93")
    return _prepare(world, world.dataset, out=folder), [folder]


def prepare_rerun_with_a_real_dataset_folder(world):  # issue 20 item 1: a folder where ctv2v's link was
    folder = _prepared_copy(world)
    (folder / "dataset").unlink()
    shutil.copytree(world.dataset, folder / "dataset")
    return _prepare(world, world.dataset, out=folder), [folder]


def prepare_rerun_with_a_file_in_the_cache(world):  # issue 20 item 1: inside an entry ctv2v made
    folder = _prepared_copy(world)
    (folder / "preprocess-cache" / "mine.json").write_text("{}")
    return _prepare(world, world.dataset, out=folder), [folder]


def prepare_out_under_a_file(world):  # issue 20 item 4
    (world.tmp / "afile").write_text("not a folder")
    return _prepare(world, world.dataset, out=world.tmp / "afile" / "P"), [world.tmp / "afile"]


def _predict_args(world: World, out: Path, *more: str, source: Path | None = None) -> list[str]:
    return ["predict", "--model", str(world.model), "--input", str(source or world.thick), "--out", str(out),
            "--device", "cpu", *more]


def _user_input(world: World) -> Path:
    return Path(shutil.copy(world.thick, world.tmp / "scan.nii.gz"))


def predict_out_exists(world):  # issue 20 item 2
    scan = _user_input(world)
    (world.tmp / "thin.nii.gz").write_bytes(b"an earlier result")
    return _predict_args(world, world.tmp / "thin.nii.gz", source=scan), [scan, world.tmp / "thin.nii.gz"]


def predict_out_is_the_input(world):  # issue 20 item 2: not even with --overwrite
    scan = _user_input(world)
    return _predict_args(world, scan, "--overwrite", source=scan), [scan]


def predict_out_is_a_hard_link_of_the_input(world):  # issue 20 item 2: same inode, another name
    scan = _user_input(world)
    os.link(scan, world.tmp / "link.nii.gz")
    return _predict_args(world, world.tmp / "link.nii.gz", "--overwrite", source=scan), [scan]


def _user_dicom_input(world: World, demo_dir: Path) -> Path:
    from tests.tiny_model import small_demo_series

    return small_demo_series(demo_dir, world.tmp / "series")


def predict_out_inside_the_input_series(world, demo_dir):  # issue 20 item 2: a DICOM input folder
    series = _user_dicom_input(world, demo_dir)
    return _predict_args(world, series / "thin.nii.gz", "--overwrite", source=series), [series]


def predict_out_dicom_is_the_input_series(world, demo_dir):  # issue 20 item 2
    series = _user_dicom_input(world, demo_dir)
    return _predict_args(world, world.tmp / "thin.nii.gz", "--out-dicom", str(series), "--overwrite",
                         source=series), [series]


def predict_overwrite_of_a_users_dicom_folder(world):  # issue 20 item 2: --overwrite replaces only ctv2v's series
    scan = _user_input(world)
    viewer = world.tmp / "viewer"
    viewer.mkdir()
    (viewer / "mine.dcm").write_bytes(b"user data")
    return _predict_args(world, world.tmp / "thin.nii.gz", "--out-dicom", str(viewer), "--overwrite",
                         source=scan), [scan, viewer]


def predict_out_dicom_is_a_link(world):  # issue 20 item 4: refused before the prediction, no .nii.gz left
    scan = _user_input(world)
    (world.tmp / "real").mkdir()
    (world.tmp / "link").symlink_to(world.tmp / "real")
    return _predict_args(world, world.tmp / "thin.nii.gz", "--out-dicom", str(world.tmp / "link"),
                         source=scan), [scan, world.tmp / "real"]


def predict_out_dicom_is_a_file(world):  # issue 20 item 4
    scan = _user_input(world)
    (world.tmp / "afile").write_text("mine")
    return _predict_args(world, world.tmp / "thin.nii.gz", "--out-dicom", str(world.tmp / "afile"),
                         source=scan), [scan, world.tmp / "afile"]


def predict_out_without_nifti_extension(world):  # issue 20 item 4
    scan = _user_input(world)
    return _predict_args(world, world.tmp / "thin.png", source=scan), [scan]


def predict_out_under_a_file(world):  # issue 20 item 4: the parent folder cannot be made
    scan = _user_input(world)
    (world.tmp / "afile").write_text("mine")
    return _predict_args(world, world.tmp / "afile" / "thin.nii.gz", source=scan), [scan, world.tmp / "afile"]


def _train(world: World, out: Path, *more: str) -> list[str]:
    return ["train", "--phase", "frozen", "--config", SMOKE, *[a for s in TRAINING_OVERRIDES for a in ("--set", s)],
            "--data", str(world.prepared), "--vae", str(world.tmp / "no-vae-needed"), "--out", str(out), *more]


def train_into_a_users_folder(world):  # issue 20 item 3
    mine = world.tmp / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "resolved-config.yaml").write_text("my: settings\n")
    (mine / "model" / "denoiser.pt").write_bytes(b"my weights")
    return _train(world, mine), [mine]


def train_resume_in_a_users_folder(world):  # issue 20 item 3: --resume does not make a folder ctv2v's
    mine = world.tmp / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "step-00000004.pt").write_bytes(b"my file")
    return _train(world, mine, "--resume"), [mine]


def _own_folder_with_checkpoint(world: World, payload: dict) -> Path:
    """An output folder ctv2v created, holding one training checkpoint with `payload`."""
    from ctv2v.files import claim_output_folder

    out = claim_output_folder(world.tmp / "out")
    (out / "checkpoints").mkdir()
    torch.save(payload, out / "checkpoints" / "step-00000004.pt")
    return out


def train_again_without_resume(world):  # issue 20 item 3: a resume is explicit
    from ctv2v.train.resume import CHECKPOINT_FORMAT

    return _train(world, _own_folder_with_checkpoint(world, {"format": CHECKPOINT_FORMAT})), []


def resume_checkpoint_missing_keys(world):  # issue 20 item 9: the right format tag, keys missing
    from ctv2v.train.resume import CHECKPOINT_FORMAT

    out = _own_folder_with_checkpoint(world, {"format": CHECKPOINT_FORMAT, "config": {}, "world_size": 1,
                                              "progress": {"epoch": 0}, "rng": [{}], "states": {}})
    return ["train-vae", "--config", SMOKE, *[a for s in TRAINING_OVERRIDES for a in ("--set", s)],
            "--data", str(world.prepared), "--out", str(out), "--resume"], []


def infinite_learning_rate(world):  # issue 20 item 10
    return ["prepare-data", "--config", SMOKE, "--set", "training.frozen.lr=.inf", "--out", str(world.tmp / "out")], []


def nan_in_a_config_file(world):  # issue 20 item 10
    path = world.tmp / "inputs" / "nan.yaml"
    path.parent.mkdir()
    path.write_text("data:\n  intensity: {hu_min: -1000, hu_max: .nan}\n")
    return ["prepare-data", "--config", SMOKE, "--config", str(path), "--out", str(world.tmp / "out")], [path]


def duplicate_key_in_a_config_file(world):  # issue 20 item 11
    path = world.tmp / "inputs" / "dup.yaml"
    path.parent.mkdir()
    path.write_text("seed: 1\ntraining:\n  grad_clip: 1.0\n  frozen: {lr: 1.0e-4}\n  grad_clip: 5.0\n")
    return ["prepare-data", "--config", SMOKE, "--config", str(path), "--out", str(world.tmp / "out")], [path]


def step_fails_after_reading_config(world):  # item 3
    return ["train-vae", "--config", SMOKE, "--data", str(world.tmp / "no-such-data"),
            "--out", str(world.tmp / "out")], []


# Issue 20, items 5-8 and 12: absurd inputs refused before they cost memory or time; models:/ and sync one-liners.
def _nifti_claiming_2000_cubed(path: Path) -> Path:
    """A 63-byte .nii.gz whose header claims 2000 x 2000 x 2000 int16 voxels (44.7 GiB as read) and holds none."""
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def prepare_nifti_claiming_2000_cubed(world):  # item 5
    folder = _user_copy(world)
    _nifti_claiming_2000_cubed(folder / "vol3.nii.gz")
    return _prepare(world, folder), [folder]


def dicom_claiming_60000_squared(world, demo_dir):  # item 5: every file's Rows x Columns, no pixels behind them
    folder = _dicom_dataset(world, demo_dir)
    for path in (folder / "series").iterdir():
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 60000
        ds.save_as(path)
    return _prepare(world, folder), [folder]


def _predict(world: World, model: str, *options: str, input_path: Path | None = None) -> list[str]:
    return ["predict", "--model", model, "--input", str(input_path or world.dataset / "vol0.nii.gz"),
            "--out", str(world.tmp / "out" / "thin.nii.gz"), "--device", "cpu", *options]


def predict_nifti_claiming_2000_cubed(world):  # item 5
    model = tiny_model(world.tmp / "inputs" / "model")
    thick = _nifti_claiming_2000_cubed(world.tmp / "inputs" / "thick.nii.gz")
    return _predict(world, str(model), input_path=thick), [world.tmp / "inputs"]


def trickling_http(world):  # item 6
    return _fetch(world, f"http://127.0.0.1:{world.trickle.port}/vae.pt", *FAST_REMOTE,
                  "storage.min_bytes_per_s=1000"), []


def trickling_s3(world):  # item 6
    world.env.update(AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")
    return _fetch(world, "s3://ctv2v/vae.pt", *FAST_REMOTE, "storage.min_bytes_per_s=1000",
                  f"storage.s3_endpoint=http://127.0.0.1:{world.trickle.port}"), []


def _dead_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        return closed.getsockname()[1]


def models_uri_dead_server(world):  # item 7
    world.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{_dead_port()}"
    return _predict(world, "models:/ctv2v-main@champion"), []


def models_uri_unknown_name(world):  # item 8
    world.env["MLFLOW_TRACKING_URI"] = world.mlflow().uri
    return _predict(world, "models:/nope@champion"), []


def models_uri_tracking_uri_flag(world):  # item 8: the flag without MLFLOW_TRACKING_URI; no ./mlflow.db appears
    return _predict(world, "models:/nope@champion", "--tracking-uri", world.mlflow().uri), []


def models_uri_no_server(world):  # item 8
    return _predict(world, "models:/nope@champion"), []


def models_uri_store_that_does_not_exist(world):  # item 8
    return _predict(world, "models:/nope@champion", "--tracking-uri", f"sqlite:///{world.tmp}/mlflow.db"), []


def _pending_journal(world: World) -> Path:
    """A step's pending MLflow journal: its server (a closed port) never answered."""
    folder = world.tmp / "runs"
    config = TrackingConfig(tracking_uri=f"http://127.0.0.1:{_dead_port()}", request_timeout_s=1, max_retries=0,
                            system_metrics_interval_s=None)
    tracker = Tracker(config, folder / "train")
    with tracker.step_run("train", "pipeline-1"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    return folder


def sync_to_a_dead_server(world):  # item 12: the chosen server, named; nothing said to be uploaded
    folder = _pending_journal(world)
    return ["tracking", "sync", "--set", "tracking.request_timeout_s=1", "--set", "tracking.max_retries=0",
            "--tracking-uri", f"http://127.0.0.1:{_dead_port()}/chosen", str(folder)], [folder]


def sync_to_a_store_that_does_not_exist(world):  # item 12
    folder = _pending_journal(world)
    return ["tracking", "sync", "--tracking-uri", f"sqlite:///{world.tmp}/mlflow.db", str(folder)], [folder]


CASES = [
    Case("out-folder-holds-the-dataset", out_is_parent_of_source, 1,
         r"OutputFolderError: {tmp}/proj: not empty and not a folder ctv2v created \(no .ctv2v-created\)"),
    Case("rerun-with-bad-s3-key", rerun_with_bad_s3_key, 1, r"StorageError: no objects under s3://ctv2v/no-such-prefix"),
    Case("rerun-with-truncated-nifti", rerun_with_truncated_volume, 1,
         r"VolumeError: {tmp}/mydata/vol1.nii.gz: voxel data cannot be read"),
    Case("s3-dataset-with-truncated-nifti", s3_dataset_with_truncated_volume, 1,
         r"VolumeError: s3://ctv2v/datasets/test_\S+/vol1.nii.gz: voxel data cannot be read"),
    Case("nan-block", nan_block, 1,
         r"VolumeError: {tmp}/mydata/vol2.nii.gz: 50 NaN/Inf voxel\(s\) in 2 of 36 slices"),
    Case("all-inf", all_nan, 1, r"VolumeError: {tmp}/mydata/vol0.nii.gz: 20736 NaN/Inf voxel\(s\) in 36 of 36"),
    Case("dicom-cut-in-pixel-data", dicom_cut_in_pixels, 1,
         r"VolumeError: {tmp}/withdicom/series/CT\S+: truncated: the file ends inside its pixel data"),
    Case("dicom-random-bytes", dicom_random_bytes, 1,
         r"VolumeError: {tmp}/withdicom/series/garbage.dcm: not a readable DICOM file"),
    Case("dicom-mixed-series", dicom_mixed_series, 1, r"VolumeError: {tmp}/withdicom/series: holds 2 series"),
    Case("dicom-mr", dicom_mr, 1, r"VolumeError: {tmp}/withdicom/series/CT\S+: Modality is 'MR'"),
    Case("dicom-missing-slice", dicom_missing_slice, 1,
         r"VolumeError: {tmp}/withdicom/series/CT\S+: 1 missing slice\(s\)"),
    Case("empty-source", empty_source, 2, r"ConfigError: --set 'data.source=': empty value for 'data.source'"),
    Case("empty-source-in-a-file", empty_source_in_a_file, 2,
         r"ConfigError: \S+smoke.yaml \+ {tmp}/inputs/empty-source.yaml: 'data.source': String should have at least 1 "
         r"character$"),
    Case("bool-as-epochs", bool_as_epochs, 2, r"'training.frozen.epochs': Input should be a valid integer"),
    Case("bool-as-checkpoint-every", bool_as_checkpoint_every, 2,
         r"'training.checkpoint_every_steps': Input should be a valid integer"),
    Case("config-typo", config_typo, 2, r"unknown key 'data.clip.frame'; did you mean 'data.clip.frames'"),
    Case("wrong-hash", wrong_hash, 1, r"HashMismatchError: file://{tmp}/inputs/vae.pt: sha256 mismatch"),
    Case("dead-endpoint", dead_endpoint, 1, r"SourceUnreachableError: cannot fetch http://127.0.0.1:\d+/vae.pt: "
                                            r"gave up after \d attempts"),
    Case("hung-http-server", hung_http, 1, r"cannot fetch http://127.0.0.1:\d+/vae.pt: gave up after \d attempts"),
    Case("hung-https-server", hung_https, 1, r"cannot fetch https://127.0.0.1:\d+/vae.pt: gave up after \d attempts"),
    Case("hung-s3-server", hung_s3, 1, r"cannot fetch s3://ctv2v/vae.pt: download of s3://ctv2v/vae.pt failed .*"
                                       r"gave up after \d attempts"),
    Case("s3-bad-key", s3_bad_key, 1, r"cannot fetch s3://ctv2v/no/such/vae.pt: .*NoSuchKey"),
    Case("s3-wrong-secret", s3_wrong_secret, 1,
         r"cannot fetch s3://ctv2v/weights/vae.pt: .*HTTP 403.*check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
    Case("match-malicious-pickle", match_malicious_pickle, 1,
         r"CheckpointFormatError: {tmp}/inputs/evil.pt: refused as VAE checkpoint: unpickling it would import "
         r"posix.system"),
    Case("match-malicious-plain-pickle", match_malicious_plain_pickle, 1,
         r"{tmp}/inputs/evil.pkl: refused as VAE checkpoint: unpickling it would import posix.system"),
    Case("match-truncated-checkpoint", match_truncated_checkpoint, 1,
         r"{tmp}/inputs/cut.pt: not a readable VAE checkpoint \(truncated"),
    Case("match-foreign-checkpoint", match_foreign_checkpoint, 1, r"{tmp}/inputs/unet.pt: not an AutoencoderKlMaisi"),
    Case("resume-from-random-bytes", resume_from_random_bytes, 1,
         r"{tmp}/out/checkpoints/step-00000004.pt: not a readable training checkpoint"),
    Case("resume-from-malicious-pickle", resume_from_malicious_pickle, 1,
         r"{tmp}/out/checkpoints/step-00000004.pt: refused as training checkpoint: unpickling it would import "
         r"posix.system"),
    Case("train-with-malicious-vae-weights", train_with_malicious_vae_weights, 1,
         r"{tmp}/inputs/vae/vae.pt: refused as VAE weights: unpickling it would import posix.system"),
    Case("step-fails-after-reading-config", step_fails_after_reading_config, 1,
         r"ManifestError: {tmp}/no-such-data/manifest.json: cannot read manifest"),
    # issue 20
    Case("prepare-rerun-with-user-files", prepare_rerun_with_user_files, 1,
         r"OutputFolderError: {tmp}/P: holds what ctv2v did not create: myresults/, notes.txt; nothing in it was "
         r"changed"),
    Case("prepare-rerun-with-a-real-dataset-folder", prepare_rerun_with_a_real_dataset_folder, 1,
         r"OutputFolderError: {tmp}/P: holds what ctv2v did not create: dataset \(a folder where ctv2v made a "
         r"link\); nothing"),
    Case("prepare-rerun-with-a-file-in-the-cache", prepare_rerun_with_a_file_in_the_cache, 1,
         r"OutputFolderError: {tmp}/P: holds what ctv2v did not create: preprocess-cache/mine.json;"),
    Case("prepare-out-under-a-file", prepare_out_under_a_file, 1,
         r"OutputFolderError: {tmp}/afile/P: cannot be created: {tmp}/afile is not a folder$"),
    Case("predict-out-exists", predict_out_exists, 1,
         r"PredictionError: --out {tmp}/thin.nii.gz: exists; pass --overwrite to replace it$"),
    Case("predict-out-is-the-input", predict_out_is_the_input, 1,
         r"PredictionError: --out {tmp}/scan.nii.gz: would write over or into the input {tmp}/scan.nii.gz; ctv2v "
         r"never does, not even with --overwrite$"),
    Case("predict-out-is-a-hard-link-of-the-input", predict_out_is_a_hard_link_of_the_input, 1,
         r"--out {tmp}/link.nii.gz: would write over or into the input {tmp}/scan.nii.gz"),
    Case("predict-out-inside-the-input-series", predict_out_inside_the_input_series, 1,
         r"--out {tmp}/series/thin.nii.gz: would write over or into the input {tmp}/series;"),
    Case("predict-out-dicom-is-the-input-series", predict_out_dicom_is_the_input_series, 1,
         r"--out-dicom {tmp}/series: would write over or into the input {tmp}/series;"),
    Case("predict-overwrite-of-a-users-dicom-folder", predict_overwrite_of_a_users_dicom_folder, 1,
         r"OutputFolderError: {tmp}/viewer: not empty and not a folder ctv2v created"),
    Case("predict-out-dicom-is-a-link", predict_out_dicom_is_a_link, 1,
         r"PredictionError: --out-dicom {tmp}/link: exists and is not a folder \(a file or a link\); give a new "
         r"folder$"),
    Case("predict-out-dicom-is-a-file", predict_out_dicom_is_a_file, 1,
         r"PredictionError: --out-dicom {tmp}/afile: exists and is not a folder"),
    Case("predict-out-without-nifti-extension", predict_out_without_nifti_extension, 1,
         r"PredictionError: --out {tmp}/thin.png: expected a .nii or .nii.gz file name$"),
    Case("predict-out-under-a-file", predict_out_under_a_file, 1,
         r"OutputFolderError: {tmp}/afile/thin.nii.gz: cannot be created: {tmp}/afile is not a folder$"),
    Case("train-into-a-users-folder", train_into_a_users_folder, 1,
         r"OutputFolderError: {tmp}/mine: not empty and not a folder ctv2v created \(no .ctv2v-created\); nothing "
         r"in it was changed"),
    Case("train-resume-in-a-users-folder", train_resume_in_a_users_folder, 1,
         r"OutputFolderError: {tmp}/mine: not empty and not a folder ctv2v created"),
    Case("train-again-without-resume", train_again_without_resume, 1,
         r"CheckpointError: {tmp}/out/checkpoints already holds step-00000004.pt: pass --resume to continue it"),
    Case("resume-checkpoint-missing-keys", resume_checkpoint_missing_keys, 1,
         r"CheckpointError: {tmp}/out/checkpoints/step-00000004.pt: an incomplete ctv2v-train-checkpoint/2 file: "
         r"missing phase, progress.batch_in_epoch, progress.global_step, progress.best_val_metric, "
         r"progress.best_val, rng\[0\].python, rng\[0\].numpy, rng\[0\].torch$"),
    Case("infinite-learning-rate", infinite_learning_rate, 2,
         r"ConfigError: \S+smoke.yaml with --set training.frozen.lr=.inf: 'training.frozen.lr': Input should be a "
         r"finite number \(got inf\)$"),
    Case("nan-in-a-config-file", nan_in_a_config_file, 2,
         r"ConfigError: \S+smoke.yaml \+ {tmp}/inputs/nan.yaml: 'data.intensity.hu_max': Input should be a finite "
         r"number \(got nan\)$"),
    Case("duplicate-key-in-a-config-file", duplicate_key_in_a_config_file, 2,
         r"ConfigError: {tmp}/inputs/dup.yaml: not valid YAML: duplicate key 'training.grad_clip' at lines 3 and 5$"),
    Case("prepare-nifti-claiming-2000-cubed", prepare_nifti_claiming_2000_cubed, 1,
         r"VolumeError: {tmp}/mydata/vol3.nii.gz: the header claims 2000 x 2000 x 2000 voxels of int16; reading them "
         r"takes 48000000000 bytes \(44.7 GiB: 2 stored \+ 4 as float32 per voxel\), more than "
         r"data.max_volume_bytes = 8589934592 \(8.0 GiB\); nothing was read$"),
    Case("dicom-claiming-60000-squared", dicom_claiming_60000_squared, 1,
         r"VolumeError: {tmp}/withdicom/series: the headers of its 20 files claim 20 x 60000 x 60000 voxels of 16 "
         r"bits; reading them takes 432000000000 bytes .*more than data.max_volume_bytes = 8589934592"),
    Case("predict-nifti-claiming-2000-cubed", predict_nifti_claiming_2000_cubed, 1,
         r"VolumeError: {tmp}/inputs/thick.nii.gz: the header claims 2000 x 2000 x 2000 voxels of int16; .* more "
         r"than data.max_volume_bytes = 8589934592"),
    Case("trickling-http-server", trickling_http, 1,
         r"SourceUnreachableError: cannot fetch http://127.0.0.1:\d+/vae.pt: gave up after \d attempts in [\d.]+ s: "
         r"transfer too slow: \d+ bytes in [\d.]+ s, below storage.min_bytes_per_s = 1000 B/s \(measured over "
         r"storage.timeout_s = 0.5 s windows\)"),
    Case("trickling-s3-server", trickling_s3, 1,
         r"cannot fetch s3://ctv2v/vae.pt: download of s3://ctv2v/vae.pt failed .*TransferTooSlowError: transfer too "
         r"slow: .* below storage.min_bytes_per_s = 1000 B/s.*gave up after \d attempts"),
    Case("models-uri-dead-server", models_uri_dead_server, 1,
         r"ModelLookupError: models:/ctv2v-main@champion: no answer \(timeout 10 s per request, retries 1\): "
         r"ConnectionRefusedError: .*\(tracking server http://127.0.0.1:\d+\)$"),
    Case("models-uri-unknown-name", models_uri_unknown_name, 1,
         r"ModelLookupError: models:/nope@champion: RESOURCE_DOES_NOT_EXIST: Registered Model with name=nope not "
         r"found \(tracking server http://127.0.0.1:\d+\)$"),
    Case("models-uri-tracking-uri-flag", models_uri_tracking_uri_flag, 1,
         r"ModelLookupError: models:/nope@champion: RESOURCE_DOES_NOT_EXIST: .*\(tracking server "
         r"http://127.0.0.1:\d+\)$"),
    Case("models-uri-no-server", models_uri_no_server, 1,
         r"ModelLookupError: models:/nope@champion: no tracking server to look it up in: give one \(--tracking-uri\) "
         r"or set MLFLOW_TRACKING_URI$"),
    Case("models-uri-store-that-does-not-exist", models_uri_store_that_does_not_exist, 1,
         r"TrackingStoreError: tracking URI sqlite:///{tmp}/mlflow.db: no such SQLite file {tmp}/mlflow.db; ctv2v "
         r"never creates a tracking store"),
    Case("sync-to-a-dead-server", sync_to_a_dead_server, 1,
         r"TrackingSyncError: 1 of 1 pending journal\(s\) not fully uploaded \(server http://127.0.0.1:\d+/chosen "
         r"unreachable\)"),
    Case("sync-to-a-store-that-does-not-exist", sync_to_a_store_that_does_not_exist, 1,
         r"TrackingStoreError: tracking URI sqlite:///{tmp}/mlflow.db: no such SQLite file"),
]
NEEDS_DEMO = {dicom_cut_in_pixels, dicom_random_bytes, dicom_mixed_series, dicom_mr, dicom_missing_slice,
              predict_out_inside_the_input_series, predict_out_dicom_is_the_input_series, dicom_claiming_60000_squared}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("bad-inputs")
    for index in range(3):
        write_phantom(root / "dataset" / f"vol{index}.nii.gz", seed=index, shape=TRAINING_PHANTOM)
    prepared = prepared_phantoms(root / "good", smoke_config(*TRAINING_OVERRIDES), volumes=3, shape=TRAINING_PHANTOM)
    model = tiny_model(root / "model")
    thick = root / "thick.nii.gz"
    hu = np.random.default_rng(0).uniform(-1000, 400, (16, 16, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), thick)  # NIfTI axes (x, y, z): 2 mm slices
    hung, trickle = HungServer(), TrickleServer()
    yield root / "dataset", prepared, s3_server, hung, model, thick, trickle
    hung.close()
    trickle.close()


@pytest.fixture()
def world(base, tmp_path, request):
    dataset, prepared, s3, hung, model, thick, trickle = base
    return World(tmp_path, dataset, prepared, s3, hung, model, thick, trickle,
                 lambda: request.getfixturevalue("mlflow_server"))


@pytest.fixture(autouse=True)
def _no_remote_settings_from_the_environment(monkeypatch):
    # MLflow's HTTP settings are set process-wide by the commands that talk to MLflow: restored after each case.
    for name in ("MLFLOW_TRACKING_URI", "S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_changes(case, world, demo_dir, capsys, caplog, monkeypatch):
    argv, kept = case.build(world, demo_dir) if case.build in NEEDS_DEMO else case.build(world)
    for key, value in world.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(world.tmp)  # a store or file a command creates in its working folder shows up below
    watched = [world.dataset, world.prepared, world.model, world.thick, world.tmp / "out", *kept]
    before = {path: snapshot(path) for path in watched}
    scratch_before = sorted(p.name for p in world.tmp.iterdir())
    started = time.monotonic()
    code = main(argv)
    elapsed_s = time.monotonic() - started
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ctv2v: error:")]
    assert code == case.code, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err and "weights_only" not in err
    assert re.search(case.message.format(tmp=re.escape(str(world.tmp))), errors[0]), errors[0]
    assert {path: snapshot(path) for path in watched} == before
    # Nothing new beside the user's folders either (no half-prepared sibling, no resolved-config.yaml).
    assert sorted(p.name for p in world.tmp.iterdir()) == scratch_before
    assert sorted(p.name for p in world.prepared.parent.iterdir()) == ["phantoms", "prepared"]
    if case.build in (hung_http, hung_https, hung_s3, dead_endpoint):
        assert elapsed_s < 10, f"a dead server held the fetch for {elapsed_s:.1f} s"
        assert "retrying in 1.0 s" in caplog.text  # each retry is logged (pytest's handler holds the log)


def test_console_script_prints_one_line_and_keeps_the_data(base, tmp_path):
    """The installed `ctv2v` script, item 1's reproduction: the dataset inside --out survives, one error line."""
    dataset, *_ = base
    project = tmp_path / "proj"
    shutil.copytree(dataset, project / "dataset")
    before = snapshot(project)
    result = subprocess.run([str(Path(sys.executable).parent / "ctv2v"), "prepare-data", "--config", SMOKE, "--set",
                             f"data.source={project / 'dataset'}", "--out", str(project)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"ctv2v: error: OutputFolderError: {project}: not empty and not a folder ctv2v created (no .ctv2v-created); "
        "nothing in it was changed: choose a new or empty output folder"]
    assert snapshot(project) == before


def test_rerun_into_a_prepared_folder_replaces_it_whole(base, tmp_path, capsys):
    """A good re-run swaps the new folder in: new manifest, the user's data untouched, the old cache reused."""
    dataset, *_ = base
    out = tmp_path / "prepared"
    assert main(_prepare_args(dataset, out)) == 0
    first = snapshot(out)
    cache_inodes = {p.name: p.stat().st_ino for p in (out / "preprocess-cache").iterdir()}
    user_before = snapshot(dataset)
    assert main(_prepare_args(dataset, out, "data.split.seed=5")) == 0
    assert snapshot(dataset) == user_before
    assert snapshot(out)["manifest.json"] != first["manifest.json"]
    assert {p.name: p.stat().st_ino for p in (out / "preprocess-cache").iterdir()} == cache_inodes  # hard links
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no sibling left behind
    capsys.readouterr()


def _prepare_args(dataset: Path, out: Path, *sets: str) -> list[str]:
    return ["prepare-data", "--config", SMOKE, "--set", f"data.source={dataset}",
            *[a for s in sets for a in ("--set", s)], "--out", str(out)]
