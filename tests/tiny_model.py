"""A tiny untrained trained-model folder, a small real CT series and registry facts for the predict, registry,
tracking and lifecycle tests."""

from __future__ import annotations

from pathlib import Path

import pydicom
import torch

from ctv2v.config import RunConfig
from ctv2v.data.readers import dicom_series_files
from ctv2v.models.artifacts import save_trained_model
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import build_untrained_vae
from ctv2v.tracking.registry import VersionFacts
from tests.conftest import TINY_NETWORKS, smoke_config

FACTS = VersionFacts(weights="scratch", smoke=False, manifest_sha256="m" * 64, evaluation_sha256="e" * 64,
                     config_sha256="c" * 64, git_commit="0" * 40, test_psnr=30.0)
"""A registrable version's facts: real weights, a full-size config, one test set."""

PREDICT_OVERRIDES = [*TINY_NETWORKS, "data.clip.frames=8", "evaluation.sample_steps=2",
                     "evaluation.tile_batch_size=8"]
"""8-frame 16x16 tiles, 2 sampling steps, 8 tiles per model call."""
DEMO_DICOM = "example_ct_dicom"
"""The demo's DICOM CT series: 20 slices 2 mm apart, 512 x 512 pixels of 0.977 mm."""
IN_PLANE_STEP = 16
SMALL_SERIES_SLICES = 5


def tiny_model(out_dir: Path, *overrides: str, thick_spacing_mm: tuple[float, float] = (2.0, 2.0)) -> Path:
    """An untrained tiny model saved as a trained-model folder (random weights, labelled scratch): plumbing,
    not quality. Its thick spacing defaults to the demo DICOM series' 2 mm."""
    config: RunConfig = smoke_config(*PREDICT_OVERRIDES, *overrides)
    torch.manual_seed(0)
    vae = build_untrained_vae(config)
    vae.weights_label = "scratch"
    return save_trained_model(build_model(config, vae), out_dir, config, None, phase="frozen",
                              thick_spacing_mm=thick_spacing_mm)


def small_demo_series(demo_dir: Path, out_dir: Path) -> Path:
    """The demo DICOM series' first slices with every 16th pixel (32 x 32 pixels of 15.6 mm, the whole field of
    view): real CT, small enough for CPU sampling in seconds. Positions and orientation are the original ones."""
    out_dir.mkdir(parents=True)
    for path in dicom_series_files(demo_dir / DEMO_DICOM)[:SMALL_SERIES_SLICES]:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[::IN_PLANE_STEP, ::IN_PLANE_STEP].copy()
        ds.PixelSpacing = [float(value) * IN_PLANE_STEP for value in ds.PixelSpacing]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(out_dir / path.name)
    return out_dir
