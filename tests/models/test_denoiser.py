"""The denoisers: depth resampling, odd latent sizes, gradient checkpointing; the reformat CNN and the slab phase."""

from __future__ import annotations

import pytest
import torch

from ctv2v.models.denoiser import Denoiser, resample_depth, slab_phase_channels


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


def test_slab_phase_is_one_hot_per_thin_frame_and_averaged_over_a_latent_frame():
    phase = slab_phase_channels(frames=8, thick_factor=4, depth_factor=1)
    assert phase.shape == (4, 8)
    torch.testing.assert_close(phase.argmax(dim=0), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert torch.all(phase.sum(dim=0) == 1)
    # A MAISI-like VAE (4 thin slices per latent frame) at x4: every latent frame holds each phase once.
    torch.testing.assert_close(slab_phase_channels(3, 4, 4), torch.full((4, 3), 0.25))
    assert torch.allclose(slab_phase_channels(2, 4, 2)[:, 0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(slab_phase_channels(2, 4, 2)[:, 1], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def reformat_denoiser(slab_phase: bool = True) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(latent_channels=2, architecture="reformat", reformat_width=8, reformat_layers=3,
                    thick_factor=4 if slab_phase else None)


def test_reformat_denoiser_reads_latents_condition_and_phase_and_starts_near_zero():
    denoiser = reformat_denoiser().eval()
    assert denoiser.reformat.convs[0].in_channels == 2 + 2 + 4
    noisy = torch.randn(2, 2, 8, 6, 5)
    out = denoiser(noisy, torch.randn(2, 2, 8, 6, 5), torch.tensor([999, 999]))
    assert out.shape == noisy.shape
    # Near zero, not zero: an untrained model returns (almost) its start, and still learns (FIELD_NOTES).
    assert 0 < float(out.detach().abs().max()) < 0.05


def test_reformat_evaluation_averages_both_plane_orientations_and_training_uses_one():
    denoiser = reformat_denoiser(slab_phase=False)
    with torch.no_grad():
        for conv in denoiser.reformat.convs:
            conv.weight.normal_(std=0.3)
    x, c, t = torch.randn(1, 2, 8, 6, 6), torch.randn(1, 2, 8, 6, 6), torch.tensor([999])
    swap = lambda v: v.transpose(3, 4)  # noqa: E731
    denoiser.eval()
    with torch.no_grad():
        both = denoiser(x, c, t)
        # Rows and columns play symmetric roles: transposing them transposes the output.
        torch.testing.assert_close(denoiser(swap(x), swap(c), t), swap(both))
        denoiser.train()
        rows_only = denoiser(x, c, t)
        columns_only = swap(denoiser(swap(x), swap(c), t))
    torch.testing.assert_close(both, 0.5 * (rows_only + columns_only))
    assert not torch.allclose(rows_only, columns_only)
