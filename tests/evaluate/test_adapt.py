"""Test-time adaptation (evaluation.adapt): the denoiser fine-tunes on the scan's in-plane axes only, of the
model's own thin series of the scan, on a copy, bounded in steps and time, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctv2v.data.cache import Preprocessed
from ctv2v.data.thick import project_to_thick, simulate_thick
from ctv2v.evaluate.adapt import adapt_to_scan, in_plane_training_volume
from ctv2v.evaluate.evaluate import predict_volume
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import build_untrained_vae
from tests.conftest import TINY_NETWORKS, smoke_config

OVERRIDES = [*TINY_NETWORKS, "data.clip.frames=8", "data.clip.height=16", "data.clip.width=16",
             "denoiser.architecture=reformat", "denoiser.slab_phase=true", "denoiser.reformat_width=8",
             "denoiser.reformat_layers=3", "data.augment.slab_phases=true", "evaluation.adapt.steps=3",
             "evaluation.adapt.batch_size=2"]


@pytest.fixture(scope="module")
def scan():
    rng = np.random.default_rng(0)
    thin = rng.normal(0, 200, (25, 20, 22)).astype(np.float32)
    config = smoke_config(*OVERRIDES)
    volume = Preprocessed("scan", thin, simulate_thick(thin, 2.0, config.data.thick), (2.0, 2.0, 2.0), np.eye(4))
    return config, volume


def model_of(config):
    torch.manual_seed(0)
    vae = build_untrained_vae(config)
    vae.weights_label = "scratch"
    return build_model(config, vae).eval()


def prediction_of(config, volume):
    """The model's thin series of the scan with data consistency: what evaluate and predict adapt on."""
    predicted = predict_volume(model_of(config), volume, config, torch.Generator().manual_seed(config.seed))
    return project_to_thick(predicted, volume.thick, predicted.shape[0])


def test_adaptation_trains_a_copy_for_the_configured_steps_and_is_seeded(scan):
    config, volume = scan
    predicted = prediction_of(config, volume)
    model = model_of(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted, report = adapt_to_scan(model, volume, predicted, config, torch.device("cpu"), 600.0)
    assert report.steps == 3 and report.seconds_budget == 600.0 and np.isfinite(report.last_loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself untouched
    changed = [k for k, v in adapted.denoiser.state_dict().items() if not torch.equal(v, before[f"denoiser.{k}"])]
    assert changed
    assert all(torch.equal(v, before[f"vae.{k}"]) for k, v in adapted.vae.state_dict().items())  # VAE frozen
    torch.manual_seed(1234)
    caller_stream = torch.get_rng_state()
    again, _ = adapt_to_scan(model, volume, predicted, config, torch.device("cpu"), 600.0)
    assert torch.equal(torch.get_rng_state(), caller_stream)  # the caller's random stream is left where it was
    for key, value in adapted.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_adaptation_never_reads_the_scans_thin_slices(scan):
    config, volume = scan
    blind = Preprocessed(volume.volume_id, np.zeros_like(volume.thin), volume.thick, volume.spacing, volume.affine)
    predicted = prediction_of(config, volume)
    np.testing.assert_array_equal(in_plane_training_volume(blind, predicted, config).thin,
                                  in_plane_training_volume(volume, predicted, config).thin)
    a, _ = adapt_to_scan(model_of(config), volume, predicted, config, torch.device("cpu"), 600.0)
    b, _ = adapt_to_scan(model_of(config), blind, predicted, config, torch.device("cpu"), 600.0)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)


def test_a_budget_too_small_for_one_step_is_an_error(scan):
    config, volume = scan
    with pytest.raises(ValueError, match=r"evaluation.adapt.seconds=1e-09: no adaptation step fits"):
        adapt_to_scan(model_of(config), volume, prediction_of(config, volume), config, torch.device("cpu"), 1e-9)


def test_the_adapted_weights_are_the_average_over_the_steps_begun_at_the_model(scan):
    """evaluation.adapt.ema_decay d after one step: d x the model's weights + (1 - d) x the stepped ones."""
    config, volume = scan
    predicted = prediction_of(config, volume)
    last_config = smoke_config(*OVERRIDES, "evaluation.adapt.steps=1", "evaluation.adapt.ema_decay=null")
    averaged_config = smoke_config(*OVERRIDES, "evaluation.adapt.steps=1", "evaluation.adapt.ema_decay=0.25")
    model = model_of(config)
    stepped, _ = adapt_to_scan(model, volume, predicted, last_config, torch.device("cpu"), 600.0)
    averaged, _ = adapt_to_scan(model, volume, predicted, averaged_config, torch.device("cpu"), 600.0)
    start = model.denoiser.state_dict()
    moved = 0
    for key, value in averaged.denoiser.state_dict().items():
        torch.testing.assert_close(value, 0.25 * start[key] + 0.75 * stepped.denoiser.state_dict()[key])
        moved += not torch.equal(value, stepped.denoiser.state_dict()[key])
    assert moved
