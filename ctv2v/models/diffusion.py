"""Noise schedules, training targets and samplers (MONAI schedulers), with all scheduler arithmetic in fp32.

Training uses DDPM forward noising (or rectified flow); sampling uses DDIM (or rectified-flow Euler steps).
Model outputs may come from fp16 autocast; they are cast to float32 before any scheduler step, and the
squared signal level alpha_bar is floored so the x0 estimate (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
cannot blow up near t = T (an earlier prototype produced NaN there under bf16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from ctv2v.config import DiffusionConfig

ALPHA_BAR_FLOOR = 1e-6
"""Lower bound on alpha_bar: 1/sqrt(alpha_bar) stays <= 1000, so one fp32 DDIM step cannot overflow."""

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(noisy latent, timesteps (B,)) -> model output."""


def _floor_alpha_bar(scheduler: DDPMScheduler | DDIMScheduler) -> None:
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.float().clamp_min(ALPHA_BAR_FLOOR)


class Diffusion:
    """The diffusion process of one DiffusionConfig: timesteps, noising, loss targets and weights, sampling."""

    def __init__(self, config: DiffusionConfig):
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        if config.scheduler == "ddpm":
            common = dict(num_train_timesteps=config.num_train_timesteps, schedule=config.beta_schedule,
                          clip_sample=False, prediction_type=config.prediction_type)
            # Latents are scaled to unit std, not to [-1, 1]: MONAI's default x0 clipping would distort them.
            self.noise_scheduler: DDPMScheduler | RFlowScheduler = DDPMScheduler(**common)
            self.sampler: DDIMScheduler | RFlowScheduler = DDIMScheduler(**common)
            _floor_alpha_bar(self.noise_scheduler)
            _floor_alpha_bar(self.sampler)
        else:
            self.noise_scheduler = RFlowScheduler(num_train_timesteps=config.num_train_timesteps,
                                                  use_discrete_timesteps=True, sample_method="uniform")
            self.sampler = self.noise_scheduler
        self.train_timestep_values: torch.Tensor | None = None
        if config.train_timesteps == "sampled":
            visited = RFlowScheduler(num_train_timesteps=config.num_train_timesteps, use_discrete_timesteps=True,
                                     sample_method="uniform")
            visited.set_timesteps(config.sample_steps)
            self.train_timestep_values = visited.timesteps.long().cpu()

    # ------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        """Uniform integer timesteps in [0, T) (rectified flow: t/T is the source's fraction), or uniform over the
        timesteps sampling visits (diffusion.train_timesteps 'sampled')."""
        if self.train_timestep_values is None:
            return torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)
        picks = torch.randint(0, len(self.train_timestep_values), (batch,), device=device, generator=generator)
        return self.train_timestep_values.to(device)[picks]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t from clean latents `x0`, in float32."""
        # MONAI's add_noise casts its alpha_bar table to the sample dtype in place: keep everything fp32.
        return self.noise_scheduler.add_noise(x0.float(), noise.float(), timesteps)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Squared signal level alpha_bar(t) per sample (DDPM only), float32."""
        if self.config.scheduler != "ddpm":
            raise ValueError("alpha_bar is defined for the DDPM schedule only")
        table = self.noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
        return table[timesteps]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: epsilon, v = sqrt(ab) eps - sqrt(1 - ab) x0, or the flow x0 - noise.

        `noise` is the chain's source sample: Gaussian noise, or for diffusion.source 'interpolation' the
        interpolation's latent (the flow then carries it to x0 along a straight line)."""
        x0, noise = x0.float(), noise.float()
        if self.config.scheduler == "rflow":
            return x0 - noise
        if self.config.prediction_type == "epsilon":
            return noise
        ab = self.alpha_bar(timesteps).view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predicted_x0(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean latent a rectified-flow velocity prediction stands for: x_t + (t / T) v, in float32."""
        if self.config.scheduler != "rflow":
            raise ValueError("predicted_x0 is defined for the rectified flow only")
        fraction = (timesteps.float() / self.num_train_timesteps).view(-1, *([1] * (noisy.ndim - 1)))
        return noisy.float() + fraction * prediction.float()

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: Min-SNR-gamma (Hang et al. 2023) when configured, else ones."""
        gamma = self.config.min_snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        ab = self.alpha_bar(timesteps)
        snr = ab / (1 - ab)
        clipped = snr.clamp(max=gamma)
        if self.config.prediction_type == "epsilon":
            return clipped / snr
        return clipped / (snr + 1)

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
             ) -> torch.Tensor:
        """Weighted mean squared error between the model output and the target, in float32."""
        error = (prediction.float() - self.target(x0, noise, timesteps)).pow(2).flatten(1).mean(1)
        return (self.loss_weights(timesteps) * error).mean()

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, denoise: DenoiseFn, shape: tuple[int, ...], steps: int, device: torch.device,
               generator: torch.Generator | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        """Clean latents of `shape` from t = T in `steps` steps (DDIM, or rectified-flow Euler).

        The chain starts from pure noise, or from `source` (the flow's source sample, e.g. the interpolation's
        latent; rectified flow only), as diffusion.source says.
        """
        if (source is not None) != (self.config.source != "noise"):
            raise ValueError(f"diffusion.source is {self.config.source!r}: sample() needs "
                             f"{'no' if self.config.source == 'noise' else 'a'} source latent")
        if source is not None:
            if tuple(source.shape) != tuple(shape):
                raise ValueError(f"source latent {tuple(source.shape)} does not have the sample shape {tuple(shape)}")
            x = source.float().clone()
        else:
            x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if self.config.scheduler == "rflow":
            self.sampler.set_timesteps(steps, device=device)
            timesteps = self.sampler.timesteps.tolist()
            for t, next_t in zip(timesteps, timesteps[1:] + [0]):
                output = self._model_output(denoise, x, t)
                x, _ = self.sampler.step(output, t, x, next_t)
                self._check_finite(x, t)
            return x
        self.sampler.set_timesteps(steps)
        for t in self.sampler.timesteps.tolist():
            output = self._model_output(denoise, x, t)
            x, _ = self.sampler.step(output, t, x)
            self._check_finite(x, t)
        return x

    @staticmethod
    def _model_output(denoise: DenoiseFn, x: torch.Tensor, t: int) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return denoise(x, timesteps).float()

    @staticmethod
    def _check_finite(x: torch.Tensor, t: int) -> None:
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"sampling produced non-finite latents at timestep {t} (shape {tuple(x.shape)})")
