"""Shared test fixtures and helpers: real servers, tiny configs, phantom CT volumes and prepared datasets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ctv2v.config import RunConfig
from ctv2v.config_io import load_config
from ctv2v.data.cache import PreprocessCache
from ctv2v.data.prepared import DATASET_DIR, MANIFEST_FILE, PREPROCESS_CACHE_DIR, prepare_data
from ctv2v.evaluate.evaluate import evaluate
from tests.mlflow_server import start_mlflow_server
from tests.servers import start_s3_server

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The real demo CT dataset folder (downloaded once per machine into ~/.cache/ctv2v, then hash-checked)."""
    from ctv2v.data.demo import fetch_demo

    return fetch_demo()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (`rclone serve s3`) on 127.0.0.1 with a `ctv2v` bucket."""
    root = tmp_path_factory.mktemp("s3")
    server = start_s3_server(root / "data", root / "rclone.log")
    server.make_bucket("ctv2v")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real MLflow tracking server (SQLite backend, artifacts proxied to `s3://ctv2v/mlflow` on s3_server)."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------- configs
TINY_NETWORKS = [
    "data.clip.height=16", "data.clip.width=16",
    "vae.scratch.channels=[8,16]", "vae.scratch.norm_num_groups=4",
    "denoiser.channels=[8,16]", "denoiser.norm_num_groups=4", "denoiser.num_head_channels=4",
    "diffusion.num_train_timesteps=50",
]
"""configs/smoke.yaml made smaller still: 16x16-voxel clips, 8-16 channel networks, 50 diffusion timesteps."""
TRAINING_OVERRIDES = [
    *TINY_NETWORKS,
    "data.clip.clips_per_volume=2", "data.split.train=0.5", "data.split.val=0.25", "data.split.test=0.25",
    "vae.scratch.epochs=1",
    "training.val_clips=2", "training.val_scored_views=1", "training.val_sample_steps=2",
    "training.checkpoint_every_steps=1",
]
"""Training tests: 2 clips per volume, a validation that samples one clip, a checkpoint every step."""
EVALUATION_OVERRIDES = [
    *TINY_NETWORKS,
    "data.split.train=0.0", "data.split.val=0.0", "data.split.test=1.0",
    "data.clip.frames=8", "data.clip.eval_overlap=0.25",
    "evaluation.sample_steps=2", "evaluation.max_volumes=null", "evaluation.volume_ids=null",
    "evaluation.tile_batch_size=4",
]
"""Evaluation tests: every volume in the test split, 8-frame 16x16 tiles."""


def smoke_config(*overrides: str) -> RunConfig:
    """configs/smoke.yaml with `overrides` (TRAINING_OVERRIDES or EVALUATION_OVERRIDES, then the test's own)."""
    return load_config([REPO / "configs" / "smoke.yaml"], list(overrides))


def training_config(*overrides: str) -> RunConfig:
    """The training tests' configuration: smoke.yaml + TRAINING_OVERRIDES + `overrides`."""
    return smoke_config(*TRAINING_OVERRIDES, *overrides)


def evaluation_config(*overrides: str) -> RunConfig:
    """The evaluation tests' configuration: smoke.yaml + EVALUATION_OVERRIDES + `overrides`."""
    return smoke_config(*EVALUATION_OVERRIDES, *overrides)


# ------------------------------------------------------------------------------------- phantom volumes
PHANTOM_AFFINE = np.array([
    [-0.8, 0.0, 0.0, 120.0],
    [0.0, 0.9, 0.0, -60.0],
    [0.0, 0.0, 1.25, 35.0],
    [0.0, 0.0, 0.0, 1.0],
])
"""NIfTI voxel (i, j, k) -> RAS mm: x flipped (i grows to the right), 0.8 x 0.9 mm in-plane, 1.25 mm slices
along k, and an origin away from zero, so a lost flip, permutation or offset changes world positions."""


EVALUATION_PHANTOM = (28, 43, 30)
"""NIfTI (x, y, z) shape of the evaluation tests' phantoms: sizes no tile divides, so tiles overlap unevenly."""
TRAINING_PHANTOM = (24, 24, 36)
"""NIfTI (x, y, z) shape of the training tests' phantoms: small in-plane, so one latent-cache tile holds a slice."""


def write_phantom(path: Path, seed: int, shape: tuple[int, int, int]) -> None:
    """A smooth CT-like NIfTI volume of `shape` (NIfTI axes x, y, z) with HU strictly inside [-1000, 1000]."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=shape), sigma=(3, 3, 2))
    hu = np.clip(field / field.std() * 350.0, -950, 950).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, PHANTOM_AFFINE), path)


def prepared_phantoms(root: Path, config: RunConfig, volumes: int, shape: tuple[int, int, int]) -> Path:
    """The prepare-data step's output folder for `volumes` phantoms vol0, vol1, ... (one patient each)."""
    phantoms = root / "phantoms"
    for index in range(volumes):
        write_phantom(phantoms / f"vol{index}.nii.gz", seed=index, shape=shape)
    source = config.model_copy(deep=True)
    source.data.source = str(phantoms)
    prepare_data(source, root / "prepared")
    return root / "prepared"


# ------------------------------------------------------------------------------------ stand-in models
class LinearInterpolationSampler(torch.nn.Module):
    """TEST-ONLY stand-in for VideoToVideoDiffusion.sample: linear interpolation between the clip's thick frames.

    Frames after the clip's last thick frame repeat it (one-sided extrapolation, as a real model would have to
    guess them); evaluation must weight those frames out, or the result differs from the linear baseline.
    """

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    interpolation = None
    """Samples from the thick clip alone (no interpolated clip needed)."""

    def sample(self, thick: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.factor
        frames = []
        for f in range(thick.shape[2] * k):
            j, r = divmod(f, k)
            if j + 1 < thick.shape[2]:
                frames.append(thick[:, :, j] * (1 - r / k) + thick[:, :, j + 1] * (r / k))
            else:
                frames.append(thick[:, :, j])
        return torch.stack(frames, dim=2)


def run_evaluate(model, data_dir: Path, config: RunConfig, out_dir: Path, weights_label: str = "scratch") -> dict:
    """ctv2v.evaluate.evaluate on a prepared data folder, sampling seeded with 0."""
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    return evaluate(model, manifest, PreprocessCache(data_dir / PREPROCESS_CACHE_DIR), data_dir / DATASET_DIR,
                    config, out_dir, torch.Generator().manual_seed(0), weights_label=weights_label)
