"""VideoToVideoDiffusion: frozen vs full phases, determinism, input checks, sampling, summary and its CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctv2v.config_io import load_config
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import ScratchVAE, build_untrained_vae
from ctv2v.train.estimate import count_sample_flops, count_step_flops
from pipeline.cli import main as cli_main

TINY = [
    "data.clip.frames=8", "data.clip.height=16", "data.clip.width=16",
    "vae.scratch.channels=[8,16]", "vae.scratch.norm_num_groups=4",
    "denoiser.channels=[8,16]", "denoiser.norm_num_groups=4", "denoiser.num_head_channels=8",
    "training.frozen.batch_size=1", "training.full.batch_size=1",
    # The model's mechanics on the thick-conditioned path from noise (the one the latent cache serves);
    # tests/models/test_v2v_design.py covers main.yaml's flow from the interpolation.
    "diffusion.scheduler=ddpm", "diffusion.source=noise", "v2v.condition=thick", "v2v.residual_decoding=false",
    # ... with the UNet denoiser and the plain clips of that path (main.yaml's reformat design is rflow-only).
    "denoiser.architecture=unet", "denoiser.slab_phase=false", "training.image_loss_weight=0.0",
    "data.augment.slab_phases=false", "data.augment.axes=false",
]
CONFIGS = ["configs/main.yaml", "configs/smoke.yaml"]


def tiny_config(*extra: str):
    return load_config(CONFIGS, [*TINY, *extra])


def tiny_model(seed: int = 0, *extra: str):
    config = tiny_config(*extra)
    torch.manual_seed(seed)
    return build_model(config, build_untrained_vae(config)), config


def clip_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    thin = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(seed))
    return thin[:, :, ::4], thin


def vae_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.vae.state_dict().items()}


def optimizer_step(model, config, thick, thin):
    optimizer = torch.optim.AdamW(model.param_groups(1e-2, 1.0, 0.01))
    model.train()
    loss, parts = model.loss(thick, thin)
    loss.backward()
    optimizer.step()
    return parts


def test_frozen_phase_leaves_the_vae_bitwise_unchanged_and_without_gradients():
    model, config = tiny_model()
    thick, thin = clip_pair()
    before, denoiser_before = vae_state(model), model.denoiser.unet.conv_in.conv.weight.clone()
    parts = optimizer_step(model, config, thick, thin)
    assert "recon_l1" not in parts
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.vae.state_dict().items())
    assert not model.vae.training  # model.train() keeps a frozen VAE in eval mode
    assert not torch.equal(model.denoiser.unet.conv_in.conv.weight, denoiser_before)


def test_full_phase_trains_the_vae_with_a_reconstruction_term():
    model, config = tiny_model()
    model.unfreeze_vae()
    thick, thin = clip_pair()
    before = vae_state(model)
    parts = optimizer_step(model, config, thick, thin)
    assert parts["recon_l1"] > 0
    recon_weight = config.training.full.recon_weight
    torch.testing.assert_close(parts["loss"], parts["diffusion"] + recon_weight * parts["recon_l1"])
    changed = [k for k, v in model.vae.state_dict().items() if not torch.equal(before[k], v)]
    assert any(k.startswith("autoencoder.encoder.") for k in changed)
    assert any(k.startswith("autoencoder.decoder.") for k in changed)


def test_param_groups_hold_the_vae_only_when_unfrozen():
    model, _ = tiny_model()
    assert {g["name"] for g in model.param_groups(1e-4, 0.1, 0.01)} == {"denoiser", "denoiser_no_decay"}
    model.unfreeze_vae()
    groups = {g["name"]: g for g in model.param_groups(1e-4, 0.1, 0.01)}
    assert groups["vae"]["lr"] == pytest.approx(1e-5) and groups["vae_no_decay"]["weight_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))


def test_same_seed_gives_identical_losses():
    losses = []
    for _ in range(2):
        model, _ = tiny_model(seed=5)
        model.unfreeze_vae()
        torch.manual_seed(11)
        loss, _ = model.loss(*clip_pair())
        losses.append(loss.item())
    assert losses[0] == losses[1]
    model, _ = tiny_model(seed=6)
    torch.manual_seed(11)
    assert model.loss(*clip_pair())[0].item() != losses[0]


def test_cached_latent_loss_equals_the_clip_loss_when_frozen():
    model, _ = tiny_model()
    thick, thin = clip_pair()
    loss, _ = model.loss(thick, thin, torch.Generator().manual_seed(3))
    with torch.no_grad():
        thick_latent, thin_latent = model.vae.encode(thick), model.vae.encode(thin)
    cached, _ = model.loss_from_latents(thick_latent, thin_latent, torch.Generator().manual_seed(3))
    assert loss.item() == cached.item()


@pytest.mark.parametrize(
    "thick_shape, thin_shape, fragment",
    [
        ((1, 1, 2, 16, 16), (1, 1, 6, 16, 16), r"thin clip \(1, 1, 6, 16, 16\) does not match thick clip"),
        ((1, 2, 2, 16, 16), (1, 1, 8, 16, 16), r"thick: expected 1 channel\(s\).*\(1, 2, 2, 16, 16\)"),
        ((1, 1, 1, 16, 16), (1, 1, 4, 16, 16), r"thick: has 1 slice\(s\) in shape \(1, 1, 1, 16, 16\)"),
    ],
)
def test_bad_clip_pairs_are_rejected(thick_shape, thin_shape, fragment):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=fragment):
        model.loss(torch.rand(thick_shape), torch.rand(thin_shape))


def test_nan_in_thin_clip_is_rejected():
    model, _ = tiny_model()
    thick, thin = clip_pair()
    thin[0, 0, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"thin: 1 NaN/Inf value\(s\) in tensor of shape \(1, 1, 8, 16, 16\)"):
        model.loss(thick, thin)


def test_variant_and_vae_kind_must_agree():
    config = tiny_config("variant=pretrained")
    with pytest.raises(ValueError, match="variant 'pretrained' needs a 'maisi' VAE"):
        build_model(config, ScratchVAE([8, 16], 4, 1, 4))


def test_sample_returns_the_thin_clip_in_unit_range_reproducibly():
    model, _ = tiny_model()
    model.eval()
    thick, _ = clip_pair()
    runs = [model.sample(thick, steps=3, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert runs[0].shape == (1, 1, 8, 16, 16)
    assert runs[0].min() >= 0 and runs[0].max() <= 1
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("phase", ["frozen", "full"])
def test_fake_tensor_flop_count_equals_a_real_run(phase):
    config = tiny_config("training.latent_cache=false")
    assert count_step_flops(config, phase, fake=True) == count_step_flops(config, phase, fake=False) > 0


def test_sample_flop_count_equals_a_real_sampling_call():
    # bench_predict's V100 time rests on this count: it must be what model.sample really computes, every step.
    model, config = tiny_model(0, "diffusion.sample_steps=3")
    thick, thin = clip_pair()
    with FlopCounterMode(display=False) as counter:
        model.eval().sample(thick, steps=3, interp=torch.rand_like(thin), generator=torch.Generator().manual_seed(0))
    assert count_sample_flops(config, tuple(thin.shape[2:])) == counter.get_total_flops() > 0
    assert count_sample_flops(config, tuple(thin.shape[2:]), batch=2) == 2 * counter.get_total_flops()


def test_model_summary_cli_prints_counts_shapes_and_flops(capsys):
    assert cli_main(["model", "summary", "--config", *CONFIGS[:1], "--config", CONFIGS[1],
                     *[arg for kv in TINY for arg in ("--set", kv)], "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, _ = tiny_model()
    params = summary["parameters"]
    assert params["vae_encoder"] + params["vae_decoder"] == sum(p.numel() for p in model.vae.parameters())
    assert params["denoiser"] == sum(p.numel() for p in model.denoiser.parameters())
    assert summary["thin_latent"] == [1, 4, 8, 8, 8] and summary["thick_latent"] == [1, 4, 2, 8, 8]
    assert summary["phases"]["full"]["flops"] > summary["phases"]["frozen"]["flops"] > 0
