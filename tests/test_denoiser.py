"""The thick-conditioned 3D denoiser: depth resampling, odd latent sizes, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from ctv2v.models.denoiser import Denoiser, resample_depth


def tiny_denoiser(checkpointing: bool = False) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(latent_channels=4, channels=[8, 16], attention_levels=[False, True], num_res_blocks=1,
                    num_head_channels=8, norm_num_groups=4, gradient_checkpointing=checkpointing)


def test_resample_depth_interpolates_along_depth_only():
    thick = torch.zeros(1, 2, 2, 3, 5)
    thick[:, :, 1] = 1.0
    thick[:, 1] += torch.arange(5.0)  # in-plane structure must pass through untouched
    out = resample_depth(thick, 8)
    assert out.shape == (1, 2, 8, 3, 5)
    profile = out[0, 0, :, 0, 0]
    assert torch.all(profile[1:] >= profile[:-1]) and profile[0] == 0 and profile[-1] == 1
    torch.testing.assert_close(out[0, 1] - out[0, 0], torch.arange(5.0).expand(8, 3, 5))


def test_odd_latent_sizes_are_padded_and_cropped_back():
    denoiser = tiny_denoiser()
    noisy = torch.randn(2, 4, 5, 7, 9)
    out = denoiser(noisy, torch.randn(2, 4, 2, 7, 9), torch.tensor([3, 900]))
    assert out.shape == noisy.shape


def test_input_channels_are_noisy_plus_thick_latent():
    assert tiny_denoiser().unet.conv_in.conv.in_channels == 8


def test_mismatched_thick_latent_is_rejected():
    with pytest.raises(ValueError, match=r"noisy latent \(1, 4, 4, 8, 8\) and condition latent \(1, 4, 1, 4, 4\)"):
        tiny_denoiser()(torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 1, 4, 4), torch.tensor([1]))


def test_gradient_checkpointing_keeps_outputs_gradients_and_state_dict_keys():
    plain, checkpointed = tiny_denoiser(False), tiny_denoiser(True)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    checkpointed.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    noisy, thick, t = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 1, 8, 8), torch.tensor([10])
    outputs, grads = [], []
    for model in (plain, checkpointed):
        model.train()
        out = model(noisy, thick, t)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])
