"""What one training micro-batch costs: random clips of the configured shapes through the real objective.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over the forward and backward pass of one
micro-batch of DiffusionObjective, the module the training loop optimizes. The model is built and run under
FakeTensorMode (shapes only, no arithmetic), so even the V100 presets are counted in seconds; the counts
depend only on shapes, and tests check they match a real run. Benchmarks time and measure the same step.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ctv2v.config import RunConfig
from ctv2v.models.summary import clip_shapes, format_model_summary, summarize_model
from ctv2v.models.v2v import VideoToVideoDiffusion, build_model
from ctv2v.models.vae import build_untrained_vae
from ctv2v.train.objectives import DiffusionObjective

Phase = Literal["frozen", "full"]


def phase_batch(config: RunConfig, phase: Phase) -> int:
    """Micro-batch size of a training phase."""
    return config.training.frozen.batch_size if phase == "frozen" else config.training.full.batch_size


def set_phase(model: VideoToVideoDiffusion, phase: Phase) -> None:
    """Freeze (frozen phase) or unfreeze (full phase) the VAE, and put the model in training mode."""
    if phase == "frozen":
        model.freeze_vae()
    else:
        model.unfreeze_vae()
    model.train()


def random_batch(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase) -> dict[str, torch.Tensor]:
    """One micro-batch of random data shaped as the training data of `phase` is.

    The frozen phase trains on cached latents when training.latent_cache is on (no VAE pass at all).
    """
    thick_shape, thin_shape = clip_shapes(config, phase_batch(config, phase))
    device = model.vae.latent_scale.device
    if phase == "frozen" and config.training.latent_cache:
        return {"thick_latent": torch.randn(model.vae.latent_shape(thick_shape), device=device),
                "thin_latent": torch.randn(model.vae.latent_shape(thin_shape), device=device)}
    thin = torch.rand(thin_shape, device=device)
    return {"thick": thin[:, :, :: config.data.thick.factor], "thin": thin}


def step_loss(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
              autocast: torch.dtype | None = None) -> torch.Tensor:
    """The objective's loss on one random micro-batch of `phase` (the model must be set to it).

    `autocast` runs it under torch.autocast with that dtype (fp16 on V100).
    """
    batch = random_batch(model, config, phase)
    device = model.vae.latent_scale.device
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with precision:
        return DiffusionObjective(model)(batch)[0]


def training_step(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
                  optimizer: torch.optim.Optimizer | None = None, autocast: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Forward + backward (+ optimizer step) of one random micro-batch, as `phase` trains."""
    set_phase(model, phase)
    loss = step_loss(model, config, phase, autocast)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def count_step_flops(config: RunConfig, phase: Phase, fake: bool = True) -> int:
    """FLOPs of one training micro-batch (forward + backward) of `phase`; `fake` counts shapes only."""
    def run() -> int:
        model = build_model(config, build_untrained_vae(config))
        with FlopCounterMode(display=False) as counter:
            training_step(model, config, phase)
        return counter.get_total_flops()

    if fake:
        with FakeTensorMode():
            return run()
    return run()


def summarize(config: RunConfig) -> dict[str, Any]:
    """The model summary (ctv2v.models.summary) plus each phase's micro-batch size and FLOPs per training step."""
    phases = {}
    for phase in ("frozen", "full"):
        phases[phase] = {
            "batch_size": phase_batch(config, phase),
            "flops": count_step_flops(config, phase),
            "vae_in_step": "trainable" if phase == "full" else (
                "none (cached latents)" if config.training.latent_cache else "frozen (forward only)"),
        }
    return {**summarize_model(config), "phases": phases,
            "flops_method": "FlopCounterMode under FakeTensorMode (shapes only, no arithmetic)"}


def format_summary(summary: dict[str, Any]) -> str:
    """summarize's result as an aligned text table."""
    lines = format_model_summary(summary)
    for phase, info in summary["phases"].items():
        lines.append(
            f"{phase + ' step':<19}batch {info['batch_size']}: {info['flops'] / 1e9:,.1f} GFLOP forward+backward "
            f"(VAE: {info['vae_in_step']})"
        )
    lines.append(f"FLOPs counted by   {summary['flops_method']}")
    return "\n".join(lines)
