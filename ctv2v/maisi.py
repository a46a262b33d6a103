"""NVIDIA MAISI's CT VAE (MONAI's AutoencoderKlMaisi): its architecture arguments and how to build it."""

from __future__ import annotations

from typing import Any

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

MAISI_CT_ARCH: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_convtranspose": False,
}
"""MAISI's CT configuration: 130 state-dict keys, 20,944,897 parameters (FIELD_NOTES, monai 1.6.1)."""

MAISI_DOWNSAMPLE = 4
"""AutoencoderKlMaisi halves every spatial axis twice."""


def build_autoencoder(
    arch: dict[str, Any],
    *,
    num_splits: int = 1,
    dim_split: int = 1,
    norm_float16: bool = False,
    use_checkpointing: bool = False,
) -> AutoencoderKlMaisi:
    """AutoencoderKlMaisi from architecture arguments plus runtime memory options (which do not change weights)."""
    return AutoencoderKlMaisi(
        **arch,
        num_splits=num_splits,
        dim_split=dim_split,
        norm_float16=norm_float16,
        use_checkpointing=use_checkpointing,
        use_flash_attention=False,
    )
