"""The clip VAE interface on the scratch VAE: shapes, input checks, latent scale, training, artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from ctv2v.models.vae import (
    ScratchVAE,
    compute_latent_scale,
    load_vae_artifact,
    read_vae_meta,
    save_vae_artifact,
)
from ctv2v.models.weights import CheckpointError, WeightsLabelError, check_weights_label, weights_display, weights_kind


def tiny_vae(seed: int = 0) -> ScratchVAE:
    torch.manual_seed(seed)
    return ScratchVAE(channels=[8, 16], latent_channels=4, num_res_blocks=1, norm_num_groups=4)


def smooth_clips(n: int, shape=(1, 1, 4, 16, 16), seed: int = 0) -> list[torch.Tensor]:
    """Smooth [0, 1] clips: random low-frequency fields upsampled (easy for a tiny VAE to learn)."""
    g = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(n):
        coarse = torch.rand((shape[0], 1, shape[2], 4, 4), generator=g)
        clips.append(torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True))
    return clips


def test_scratch_vae_keeps_every_slice_and_restores_odd_sizes():
    vae = tiny_vae()
    assert (vae.depth_factor, vae.spatial_factor, vae.kind) == (1, 2, "scratch")
    clip = torch.rand(2, 1, 6, 30, 34)
    latent = vae.encode(clip)
    assert tuple(latent.shape) == vae.latent_shape(clip.shape) == (2, 4, 6, 15, 17)
    odd = torch.rand(1, 1, 5, 15, 17)
    latent = vae.encode(odd)
    assert tuple(latent.shape) == (1, 4, 5, 8, 9)
    assert vae.decode(latent, size=odd.shape[2:]).shape == odd.shape


@pytest.mark.parametrize(
    "shape, fill, fragment",
    [
        ((1, 2, 4, 16, 16), 0.5, "channel"),
        ((1, 4, 16, 16), 0.5, "4 dims"),
        ((1, 1, 1, 16, 16), 0.5, "1 slice"),
        ((1, 1, 4, 16, 16), float("nan"), "NaN"),
        ((1, 1, 4, 16, 16), float("inf"), "NaN/Inf"),
    ],
)
def test_bad_clips_raise_value_error_naming_tensor_and_shape(shape, fill, fragment):
    vae = tiny_vae()
    clip = torch.full(shape, 0.5)
    clip.view(-1)[3] = fill
    with pytest.raises(ValueError) as info:
        vae.encode(clip)
    message = str(info.value)
    assert message.startswith("clip:") and str(tuple(shape)) in message and fragment in message


def test_decode_rejects_latent_with_wrong_channels():
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"latent: expected 4 channel\(s\).*\(1, 3, 4, 8, 8\)"):
        vae.decode(torch.zeros(1, 3, 4, 8, 8))


def test_latent_scale_makes_unit_std_and_cancels_in_decode():
    vae = tiny_vae().eval()
    clips = smooth_clips(3)
    with torch.no_grad():
        before = vae.decode(vae.encode(clips[0]))
        scale = compute_latent_scale(vae, clips)
        assert float(vae.latent_scale) == pytest.approx(scale)
        latents = torch.cat([vae.encode(c).flatten() for c in clips])
        assert latents.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
        torch.testing.assert_close(vae.decode(vae.encode(clips[0])), before, rtol=1e-4, atol=1e-5)


def test_latent_scale_needs_clips():
    with pytest.raises(ValueError, match="no clips"):
        compute_latent_scale(tiny_vae(), [])


def test_scratch_vae_objective_lowers_reconstruction_error():
    from ctv2v.train.objectives import ScratchVAEObjective

    vae = tiny_vae()
    clips = smooth_clips(2)
    objective = ScratchVAEObjective(vae, kl_weight=1e-6)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    with torch.no_grad():
        initial = sum(torch.nn.functional.l1_loss(vae.decode(vae.encode(c)), c).item() for c in clips) / 2
    for _ in range(5):
        for clip in clips:
            loss, parts = objective({"thin": clip})
            assert set(parts) == {"l1", "kl", "posterior_std"}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = sum(torch.nn.functional.l1_loss(vae.decode(vae.encode(c)), c).item() for c in clips) / 2
    assert final < 0.5 * initial


def test_artifact_round_trip_gives_identical_outputs(tmp_path):
    vae = tiny_vae(seed=3).eval()
    vae.latent_scale.fill_(0.731)
    save_vae_artifact(vae, tmp_path, weights="scratch", extra={"epochs": 1})
    meta = json.loads((tmp_path / "vae.json").read_text())
    assert meta["kind"] == "scratch" and meta["weights"] == "scratch" and meta["extra"] == {"epochs": 1}
    assert meta["architecture"]["channels"] == [8, 16] and meta["latent_scale"] == pytest.approx(0.731)
    loaded = load_vae_artifact(tmp_path).eval()
    assert loaded.weights_label == "scratch" and float(loaded.latent_scale) == pytest.approx(0.731)
    clip = smooth_clips(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded.encode(clip), vae.encode(clip))
        latent = vae.encode(clip)
        assert torch.equal(loaded.decode(latent), vae.decode(latent))


def test_vae_meta_reads_what_the_artifact_wrote_and_names_a_broken_file(tmp_path):
    vae = tiny_vae()
    vae.latent_scale.fill_(0.5)
    save_vae_artifact(vae, tmp_path, weights="scratch", extra={})
    meta = read_vae_meta(tmp_path)
    assert (meta.kind, meta.weights, meta.latent_scale) == ("scratch", "scratch", 0.5)
    written = json.loads((tmp_path / "vae.json").read_text())
    del written["latent_scale"]
    (tmp_path / "vae.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match=r"vae\.json: not a VAE artifact description \(KeyError\('latent_scale'\)\)"):
        read_vae_meta(tmp_path)


def test_artifact_with_other_architecture_fails_listing_keys(tmp_path):
    save_vae_artifact(tiny_vae(), tmp_path, weights="scratch", extra={})
    meta = json.loads((tmp_path / "vae.json").read_text())
    meta["architecture"]["num_res_blocks"] = 2
    (tmp_path / "vae.json").write_text(json.dumps(meta))
    expected = r"vae\.pt: state dict does not match.*64 missing key\(s\) \['encoder\.2\.norm1\.weight'"
    with pytest.raises(CheckpointError, match=expected):
        load_vae_artifact(tmp_path)


def test_artifact_weights_replaced_behind_json_are_rejected(tmp_path):
    save_vae_artifact(tiny_vae(), tmp_path, weights="scratch", extra={})
    torch.save({"x": torch.zeros(1)}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="sha256"):
        load_vae_artifact(tmp_path)


def test_artifact_rejects_unknown_weights_label(tmp_path):
    with pytest.raises(ValueError, match="weights must be one of"):
        save_vae_artifact(tiny_vae(), tmp_path, weights="random", extra={})
    assert not (tmp_path / "vae.pt").exists()


def test_weights_labels_have_one_kind_and_one_display_text():
    assert weights_kind("scratch, fine-tuned (full phase)") == "scratch"
    assert weights_display("scratch, fine-tuned (full phase)") == "VAE trained from scratch, fine-tuned (full phase)"
    assert weights_display("stand-in") == "stand-in (random MAISI-layout weights)"
    assert check_weights_label("pretrained, epoch 3") == "pretrained, epoch 3"
    for bad, fragment in (("random", "'random': expected one of pretrained, scratch, stand-in"),
                          ("", "no weights label"), (None, "no weights label")):
        with pytest.raises(WeightsLabelError, match=fragment):
            weights_kind(bad)
