"""Diffusion process: targets and weights against their formulas, fp32 sampling from t = T with fp16 outputs."""

from __future__ import annotations

import pytest
import torch

from ctv2v.config import ConfigError, DiffusionConfig
from ctv2v.config_io import validate
from ctv2v.models.diffusion import ALPHA_BAR_FLOOR, Diffusion

T = 1000


def alpha_bar_formula(t: torch.Tensor) -> torch.Tensor:
    """Scaled-linear schedule: beta from 1e-4 to 2e-2 linear in sqrt; alpha_bar = prod(1 - beta)."""
    betas = torch.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t]


def test_v_prediction_target_matches_formula():
    diffusion = Diffusion(DiffusionConfig(prediction_type="v_prediction"))
    x0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    ab = alpha_bar_formula(t).float().view(3, 1, 1, 1, 1)
    torch.testing.assert_close(diffusion.target(x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(diffusion.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


def test_epsilon_and_rflow_targets():
    x0, noise, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4), torch.tensor([1, 700])
    assert torch.equal(Diffusion(DiffusionConfig()).target(x0, noise, t), noise)
    rflow = Diffusion(DiffusionConfig(scheduler="rflow", prediction_type="v_prediction"))
    torch.testing.assert_close(rflow.target(x0, noise, t), x0 - noise)
    frac = (t.float() / T).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(rflow.add_noise(x0, noise, t), (1 - frac) * x0 + frac * noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_formula(prediction_type):
    gamma = 5.0
    diffusion = Diffusion(DiffusionConfig(prediction_type=prediction_type, min_snr_gamma=gamma))
    t = torch.tensor([0, 10, 100, 400, 999])
    ab = alpha_bar_formula(t)
    snr = ab / (1 - ab)
    expected = torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(diffusion.loss_weights(t), expected.float())
    assert diffusion.loss_weights(t)[0] < 0.01  # the near-clean step no longer dominates the loss


def test_no_min_snr_means_equal_weights():
    assert torch.equal(Diffusion(DiffusionConfig()).loss_weights(torch.tensor([0, 999])), torch.ones(2))


def test_min_snr_and_epsilon_are_config_errors_with_rflow():
    with pytest.raises(ConfigError, match="v_prediction"):
        validate({"diffusion": {"scheduler": "rflow"}}, "test.yaml")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        validate({"diffusion": {"scheduler": "rflow", "prediction_type": "v_prediction", "min_snr_gamma": 5}}, "t")


def test_half_precision_inputs_do_not_downcast_the_schedule():
    diffusion = Diffusion(DiffusionConfig())
    x = diffusion.add_noise(torch.randn(1, 4, 2, 4, 4).half(), torch.randn(1, 4, 2, 4, 4).half(), torch.tensor([999]))
    assert x.dtype == torch.float32 and diffusion.noise_scheduler.alphas_cumprod.dtype == torch.float32
    assert float(diffusion.noise_scheduler.alphas_cumprod.min()) >= ALPHA_BAR_FLOOR


class HalfOracle(torch.nn.Module):
    """A perfect denoiser for a known x0 whose output is fp16, like a UNet under fp16 autocast."""

    def __init__(self, diffusion: Diffusion, x0: torch.Tensor):
        super().__init__()
        self.diffusion, self.x0 = diffusion, x0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        config = self.diffusion.config
        if config.scheduler == "rflow":
            frac = t.float().view(-1, 1, 1, 1, 1) / T
            noise = (x - (1 - frac) * self.x0) / frac
            return (self.x0 - noise).half()
        ab = self.diffusion.alpha_bar(t).view(-1, 1, 1, 1, 1)
        noise = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return self.diffusion.target(self.x0, noise, t).half()


@pytest.mark.parametrize("sample_steps, visited", [(1, {1000}), (4, {1000, 750, 500, 250})])
def test_sampled_training_timesteps_are_exactly_those_sampling_visits(sample_steps, visited):
    """One-step sampling starts at t = T, a timestep uniform training ([0, T)) never draws: `sampled` trains there."""
    config = DiffusionConfig(scheduler="rflow", prediction_type="v_prediction", source="interpolation",
                             sample_steps=sample_steps, train_timesteps="sampled")
    drawn = Diffusion(config).sample_timesteps(400, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == visited
    x0, source = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    at_start = Diffusion(config).add_noise(x0, source, torch.full((2,), 1000))
    torch.testing.assert_close(at_start, source)  # at t = T the denoiser sees the source latent alone
    with pytest.raises(ConfigError, match="train_timesteps"):
        validate({"diffusion": {"train_timesteps": "sampled"}}, "test.yaml")


@pytest.mark.parametrize("scheduler, prediction_type", [
    ("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("rflow", "v_prediction")])
def test_sampling_from_t_max_with_fp16_outputs_is_finite_and_lands_on_x0(scheduler, prediction_type):
    diffusion = Diffusion(DiffusionConfig(scheduler=scheduler, prediction_type=prediction_type))
    x0 = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    oracle = HalfOracle(diffusion, x0)
    sample = diffusion.sample(oracle, tuple(x0.shape), steps=50, device=torch.device("cpu"),
                              generator=torch.Generator().manual_seed(1))
    assert sample.dtype == torch.float32 and torch.isfinite(sample).all()
    # a perfect (if fp16-rounded) model must bring pure noise back to x0 (unit-variance latents: errors ~1e-5)
    assert (sample - x0).abs().max() < 1e-3


def test_sampling_is_reproducible_with_a_generator():
    diffusion = Diffusion(DiffusionConfig())
    def denoise(x, t):
        return (0.1 * x).half()
    runs = [diffusion.sample(denoise, (1, 4, 2, 4, 4), 5, torch.device("cpu"), torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_non_finite_sampling_is_reported_not_returned():
    diffusion = Diffusion(DiffusionConfig())
    with pytest.raises(FloatingPointError, match="non-finite latents at timestep 999"):
        diffusion.sample(lambda x, t: torch.full_like(x, float("inf")), (1, 4, 2, 4, 4), 5, torch.device("cpu"))
