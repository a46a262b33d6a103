"""Model summary for a config: parameter counts and clip and latent shapes (no training; see ctv2v.train.estimate)."""

from __future__ import annotations

from typing import Any

from ctv2v.config import RunConfig
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import build_untrained_vae


def clip_shapes(config: RunConfig, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(thick, thin) clip shapes of one batch: thin (B, 1, T, H, W), thick (B, 1, T/k, H, W)."""
    clip, factor = config.data.clip, config.data.thick.factor
    if clip.frames % factor:
        raise ValueError(f"data.clip.frames={clip.frames} is not a multiple of data.thick.factor={factor}")
    return (batch, 1, clip.frames // factor, clip.height, clip.width), (batch, 1, clip.frames, clip.height, clip.width)


def summarize_model(config: RunConfig) -> dict[str, Any]:
    """Parameter counts and the clip and latent shapes of one clip for `config` (random weights)."""
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
    }


def format_model_summary(summary: dict[str, Any]) -> list[str]:
    """The lines of summarize_model's result, aligned as a text table."""
    p = summary["parameters"]
    return [
        f"variant            {summary['variant']}  (VAE: {summary['vae_kind']}, {summary['vae_weights']})",
        f"encode mode        {summary['encode_mode']}",
        f"parameters         VAE encoder {p['vae_encoder']:,} | VAE decoder {p['vae_decoder']:,} | "
        f"denoiser {p['denoiser']:,} | total {p['total']:,}",
        f"thin clip          {summary['thin_clip']} -> latent {summary['thin_latent']}",
        f"thick clip         {summary['thick_clip']} -> latent {summary['thick_latent']}",
    ]
