"""MAISI VAE wrapper on the REAL MAISI CT architecture, tiny inputs, RANDOM weights (the checkpoint is not
reachable from here). Random weights do not reconstruct anything, so nothing here checks image quality: the
tests check shapes, padding, and which input slices each output slice depends on, which hold for any weights.
"""

from __future__ import annotations

import pytest
import torch

from ctv2v.config import MaisiVAEConfig
from ctv2v.models.maisi import MAISI_CT_ARCH, MAISI_DOWNSAMPLE, MatchReport, match_report
from ctv2v.models.vae import MaisiVAE

TILE = {"depth": 8, "height": 8, "width": 16, "overlap": 0.5}


@pytest.fixture(scope="module")
def maisi_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MaisiVAE(MAISI_CT_ARCH).state_dict()


def maisi(state: dict, **runtime) -> MaisiVAE:
    vae = MaisiVAE(MAISI_CT_ARCH, MaisiVAEConfig(**runtime))
    vae.load_state_dict(state)
    return vae.eval()


def ramp(depth: int = 16, height: int = 16, width: int = 16) -> torch.Tensor:
    """A smooth synthetic volume in [0, 1]: linear ramps along depth, height and width."""
    d = torch.linspace(0, 1, depth).view(depth, 1, 1)
    h = torch.linspace(0, 1, height).view(1, height, 1)
    w = torch.linspace(0, 1, width).view(1, 1, width)
    return (0.2 + 0.4 * d + 0.25 * h + 0.15 * w)[None, None].contiguous()


def test_real_ct_architecture_has_130_keys_and_20944897_parameters():
    vae = MaisiVAE(MAISI_CT_ARCH)
    assert len(vae.autoencoder.state_dict()) == 130
    assert sum(p.numel() for p in vae.autoencoder.parameters()) == 20_944_897
    assert sum(vae.part_parameters().values()) == 20_944_897
    assert vae.depth_factor == vae.spatial_factor == MAISI_DOWNSAMPLE


@torch.no_grad()
def test_every_mode_gives_the_same_latent_shape_and_restores_the_clip_shape(maisi_state):
    clip = ramp(16, 8, 16)
    for mode in ("volume", "stack", "tiled"):
        vae = maisi(maisi_state, encode_mode=mode, stack_size=4, tile=TILE)
        latent = vae.encode(clip)
        assert tuple(latent.shape) == vae.latent_shape(clip.shape) == (1, 4, 4, 2, 4), mode
        assert torch.isfinite(latent).all(), mode
        assert vae.decode(latent).shape == clip.shape, mode


@torch.no_grad()
def test_tiled_with_one_tile_covering_the_clip_equals_volume(maisi_state):
    clip = ramp(8, 16, 16)
    volume = maisi(maisi_state, encode_mode="volume")
    tiled = maisi(maisi_state, encode_mode="tiled", tile={"depth": 32, "height": 32, "width": 32})
    latent = volume.encode(clip)
    torch.testing.assert_close(tiled.encode(clip), latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled.decode(latent), volume.decode(latent), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["volume", "stack", "tiled"])
def test_odd_sizes_are_padded_and_cropped_back_never_truncated(maisi_state, mode):
    vae = maisi(maisi_state, encode_mode=mode, stack_size=4, tile=TILE)
    clip = ramp(5, 14, 18)
    latent = vae.encode(clip)
    assert tuple(latent.shape) == (1, 4, 2, 4, 5)  # ceil(5/4), ceil(14/4), ceil(18/4): padded up, not down
    assert vae.decode(latent, size=clip.shape[2:]).shape == clip.shape
    changed_last_slice = clip.clone()
    changed_last_slice[:, :, 4] += 0.3
    # MAISI alone truncates 5 slices to 4, so the 5th slice would not reach the latent at all.
    assert (vae.encode(changed_last_slice) - latent).abs().max() > 1e-4


@torch.no_grad()
def test_stack_cuts_context_at_group_boundaries_volume_does_not(maisi_state):
    """Seam metric: cross-boundary influence. Change only the slices after a group boundary and measure how much
    the decoded slices before it move. Zero means the two sides of the boundary are computed from disjoint
    inputs: a hard seam, whatever the weights (with trained weights it shows as an intensity step every group).
    """
    boundary = 8
    clip = ramp(16, 8, 8)
    other_side = clip.clone()
    other_side[:, :, boundary:] = other_side[:, :, boundary:].flip(2)  # same values, opposite ramp direction

    def influence(vae: MaisiVAE) -> tuple[float, float]:
        latent, latent_other = vae.encode(clip), vae.encode(other_side)
        near = slice(boundary - 4, boundary)
        decoded_delta = (vae.decode(latent) - vae.decode(latent_other))[:, :, near].abs().max().item()
        latent_delta = (latent - latent_other)[:, :, : boundary // 4].abs().max().item()
        return decoded_delta, latent_delta

    stack = influence(maisi(maisi_state, encode_mode="stack", stack_size=boundary))
    volume = influence(maisi(maisi_state, encode_mode="volume"))
    assert stack == (0.0, 0.0)
    assert volume[0] > 1e-3 and volume[1] > 1e-3


def test_norm_float16_is_an_error_on_cpu(maisi_state):
    vae = maisi(maisi_state, norm_float16=True)
    with pytest.raises(ValueError, match="norm_float16 needs a CUDA device"):
        vae.encode(ramp(4, 8, 8))


def test_stack_size_must_be_a_multiple_of_the_depth_factor():
    with pytest.raises(ValueError, match="multiple of 4"):
        MaisiVAEConfig(stack_size=6)


@torch.no_grad()
def test_artifact_keeps_maisi_layout_and_round_trips_with_runtime_options(maisi_state, tmp_path):
    from ctv2v.models.vae import load_vae_artifact, save_vae_artifact

    vae = maisi(maisi_state)
    vae.latent_scale.fill_(1.7)
    save_vae_artifact(vae, tmp_path, weights="stand-in", extra={"source": "random weights, MAISI layout"})
    assert len(torch.load(tmp_path / "vae.pt", weights_only=True)) == 130  # exactly AutoencoderKlMaisi's keys
    loaded = load_vae_artifact(tmp_path, MaisiVAEConfig(encode_mode="stack", stack_size=4)).eval()
    assert loaded.encode_mode == "stack" and loaded.weights_label == "stand-in"
    assert float(loaded.latent_scale) == pytest.approx(1.7)
    clip = ramp(4, 8, 8)
    assert torch.equal(loaded.encode(clip), vae.encode(clip))


def test_match_report_has_one_json_form(maisi_state):
    import json

    network = MaisiVAE(MAISI_CT_ARCH).autoencoder
    state = {k.removeprefix("autoencoder."): v for k, v in maisi_state.items()
             if k.startswith("autoencoder.") and not k.startswith("autoencoder.decoder.")}
    state["extra.weight"] = torch.zeros(1)
    report = match_report(network, state)
    assert report.status == "failed" and report.unexpected == ["extra.weight"] and report.loaded < report.total
    data = json.loads(json.dumps(report.to_dict()))
    assert data["loaded"] == report.loaded and data["total"] == 130 and data["status"] == "failed"
    assert MatchReport.from_dict(data) == report
    assert MatchReport.from_dict(data).loaded_fraction == report.loaded / 130
    with pytest.raises(ValueError, match="contradicts"):
        MatchReport.from_dict({**data, "status": "complete"})
    with pytest.raises(ValueError, match="unknown key"):
        MatchReport.from_dict({**data, "loaded_fraction": "130/130"})
