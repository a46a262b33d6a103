"""Model summary for a config: parameter counts, latent shapes and FLOPs per training step.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over the forward and backward pass of one
micro-batch. The model is built and run under FakeTensorMode (shapes only, no arithmetic), so even the V100
presets are counted in seconds; the counts depend only on shapes, and tests check they match a real run.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ctv2v.config import RunConfig
from ctv2v.models.v2v import VideoToVideoDiffusion, build_model
from ctv2v.models.vae import build_untrained_vae

Phase = Literal["frozen", "full"]


def clip_shapes(config: RunConfig, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(thick, thin) clip shapes of one batch: thin (B, 1, T, H, W), thick (B, 1, T/k, H, W)."""
    clip, factor = config.data.clip, config.data.thick.factor
    if clip.frames % factor:
        raise ValueError(f"data.clip.frames={clip.frames} is not a multiple of data.thick.factor={factor}")
    return (batch, 1, clip.frames // factor, clip.height, clip.width), (batch, 1, clip.frames, clip.height, clip.width)


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


def step_loss(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
              autocast: torch.dtype | None = None) -> torch.Tensor:
    """Forward pass of one training micro-batch of random clips of `phase` (the model must be set to it).

    The frozen phase trains on cached latents when training.latent_cache is on (no VAE pass at all).
    `autocast` runs it under torch.autocast with that dtype (fp16 on V100).
    """
    thick_shape, thin_shape = clip_shapes(config, phase_batch(config, phase))
    device = model.vae.latent_scale.device
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with precision:
        if phase == "frozen" and config.training.latent_cache:
            thick_latent = torch.randn(model.vae.latent_shape(thick_shape), device=device)
            thin_latent = torch.randn(model.vae.latent_shape(thin_shape), device=device)
            return model.loss_from_latents(thick_latent, thin_latent)[0]
        thin = torch.rand(thin_shape, device=device)
        return model.loss(thin[:, :, :: config.data.thick.factor], thin)[0]


def training_step(model: VideoToVideoDiffusion, config: RunConfig, phase: Phase,
                  optimizer: torch.optim.Optimizer | None = None, autocast: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Forward + backward (+ optimizer step) of one micro-batch of random clips, as `phase` trains."""
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
    """Parameter counts, clip and latent shapes, and FLOPs per training micro-batch for `config`."""
    vae = build_untrained_vae(config)
    model = build_model(config, vae)
    parts = vae.part_parameters()
    params = {
        "vae_encoder": parts["encoder"],
        "vae_decoder": parts["decoder"],
        "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
    }
    params["total"] = sum(params.values())
    thick, thin = clip_shapes(config, 1)
    weights = ("random weights with MAISI's CT architecture (summary only; runs load the checkpoint)"
               if vae.kind == "maisi" else "random weights (summary only; runs train them)")
    phases = {}
    for phase in ("frozen", "full"):
        phases[phase] = {
            "batch_size": phase_batch(config, phase),
            "flops": count_step_flops(config, phase),
            "vae_in_step": "trainable" if phase == "full" else (
                "none (cached latents)" if config.training.latent_cache else "frozen (forward only)"),
        }
    return {
        "variant": config.variant,
        "vae_kind": vae.kind,
        "vae_weights": weights,
        "encode_mode": config.vae.maisi.encode_mode if vae.kind == "maisi" else "volume (depth factor 1)",
        "parameters": params,
        "thin_clip": thin,
        "thick_clip": thick,
        "thin_latent": vae.latent_shape(thin),
        "thick_latent": vae.latent_shape(thick),
        "phases": phases,
        "flops_method": "FlopCounterMode under FakeTensorMode (shapes only, no arithmetic)",
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    p = summary["parameters"]
    lines = [
        f"variant            {summary['variant']}  (VAE: {summary['vae_kind']}, {summary['vae_weights']})",
        f"encode mode        {summary['encode_mode']}",
        f"parameters         VAE encoder {p['vae_encoder']:,} | VAE decoder {p['vae_decoder']:,} | "
        f"denoiser {p['denoiser']:,} | total {p['total']:,}",
        f"thin clip          {summary['thin_clip']} -> latent {summary['thin_latent']}",
        f"thick clip         {summary['thick_clip']} -> latent {summary['thick_latent']}",
    ]
    for phase, info in summary["phases"].items():
        lines.append(
            f"{phase + ' step':<19}batch {info['batch_size']}: {info['flops'] / 1e9:,.1f} GFLOP forward+backward "
            f"(VAE: {info['vae_in_step']})"
        )
    lines.append(f"FLOPs counted by   {summary['flops_method']}")
    return "\n".join(lines)
