"""Issue 11: the model starts from interpolation quality and only improves as it learns.

Covers the six fixes (tissue val tiles, one VAE reconstruction scored, the VAE's deterministic path, velocity
sampling, one encoding path for training and sampling, a common voxel spacing) and the design (the
interpolation's latent as condition and flow source, residual decoding, data consistency).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctv2v.config import DiffusionConfig, ResampleConfig, ThickConfig
from ctv2v.data.cache import Preprocessed
from ctv2v.data.clips import eval_tiles, extract_clip
from ctv2v.data.interpolation import Interpolation, covered_slices
from ctv2v.data.thick import box_resample_weights, project_to_thick, resample_spacing, simulate_thick, thick_operator
from ctv2v.models.diffusion import Diffusion
from ctv2v.intensity import Intensity
from tests.conftest import TRAINING_PHANTOM, prepared_phantoms, training_config

BRIDGE = ["diffusion.scheduler=rflow", "diffusion.prediction_type=v_prediction", "diffusion.source=interpolation",
          "v2v.condition=interpolation", "v2v.residual_decoding=true", "training.latent_cache=false"]
"""The issue-11 design on top of the tiny test config."""


def phantom_volume(shape=(21, 40, 40), method="slab_average", seed=0) -> Preprocessed:
    """A CT-like volume (air around a soft-tissue body with bright inclusions) and its thick series (x4, 1 mm)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = y ** 2 + x ** 2 < 0.3
    thin = np.where(body, 40.0, -1000.0) + rng.normal(0, 30, shape)
    thin += 900.0 * (np.sin(5 * z + 3 * x) > 0.8) * body
    thin = thin.astype(np.float32)
    thick = simulate_thick(thin, 1.0, ThickConfig(method=method, factor=4))
    return Preprocessed("phantom", thin, thick, (1.0, 1.0, 1.0), np.eye(4))


# ------------------------------------------------------------------------------------ fix 6: spacing
def test_resampling_is_the_identity_at_the_same_spacing_and_averages_when_coarsening():
    volume = np.random.default_rng(0).normal(size=(8, 6, 4)).astype(np.float32)
    same, spacing, affine = resample_spacing(volume, (3.0, 3.0, 3.0), np.eye(4), ResampleConfig(slice_mm=3.0))
    np.testing.assert_array_equal(same, volume)
    assert spacing == (3.0, 3.0, 3.0)
    coarse, spacing, affine = resample_spacing(volume, (1.5, 2.0, 2.0), np.eye(4),
                                               ResampleConfig(slice_mm=3.0, pixel_mm=4.0))
    assert coarse.shape == (4, 3, 2) and spacing == (3.0, 4.0, 4.0)
    expected = volume.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(coarse, expected, atol=1e-5)
    # New voxel (0, 0, 0) averages old voxels 0..1 along each axis: its centre is old index 0.5.
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [0.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert np.allclose(box_resample_weights(5, 2.0, 3.0).sum(axis=1), 1.0)


def test_resampled_spacing_sets_the_physical_gap_of_the_thick_series():
    volume = np.random.default_rng(1).normal(size=(40, 4, 4)).astype(np.float32)
    for spacing in (1.5, 3.0):
        thin, new_spacing, _ = resample_spacing(volume, (spacing, 1, 1), np.eye(4), ResampleConfig(slice_mm=3.0))
        thick = simulate_thick(thin, new_spacing[0], ThickConfig(factor=4))
        assert thick.spacing_mm == 12.0


# ------------------------------------------------------------------------------------ data consistency
@pytest.mark.parametrize("method", ["slab_average", "subsample"])
@pytest.mark.parametrize("slices", [21, 22, 24])
def test_data_consistency_reproduces_the_measured_thick_series(method, slices):
    volume = phantom_volume((slices, 12, 12), method)
    covered = covered_slices(volume.thick)
    guess = Interpolation("cubic").of(volume)[:covered] + 50.0
    projected = project_to_thick(guess, volume.thick, slices)
    rows, operator = thick_operator(volume.thick, slices)
    assert len(rows) >= volume.thick.array.shape[0] - 1
    remade = np.tensordot(operator, projected.astype(np.float64), axes=1)
    np.testing.assert_allclose(remade, volume.thick.array[rows], atol=1e-3)
    # The true thin series is consistent already: the projection leaves it where it is.
    np.testing.assert_allclose(project_to_thick(volume.thin[:covered], volume.thick, slices), volume.thin[:covered],
                               atol=1e-3)


# ------------------------------------------------------------------------------------ fix 1: val tiles
def test_validation_tiles_hold_tissue_and_are_never_constant():
    from ctv2v.train.validation import fixed_val_clips

    volume = phantom_volume((21, 128, 128))
    config = training_config("data.clip.height=32", "data.clip.width=32")
    corners = eval_tiles(volume.thin.shape, config.data.clip, 4, volume.thick.array.shape[0])
    air = extract_clip(volume, corners[0], Intensity())["thin"]
    assert air.std() < 0.05, "the phantom's corner tile should be (noisy) air"
    clips = fixed_val_clips([volume], config.data.clip, Intensity(), 4)
    assert len(clips) == 4
    for clip in clips:
        assert float(clip["thin"].std()) > 0.1
        assert float((clip["thin"] > 0.25).float().mean()) > 0.5  # above -500 HU: tissue


def test_a_short_isotropic_val_volume_is_validated_along_its_in_plane_axes_too():
    from ctv2v.train.validation import val_clips_of

    short = phantom_volume((13, 48, 40))  # the demo's val series: 13 slices at 3 mm hold 3 thick slabs
    config = training_config("data.clip.frames=16", "data.clip.height=16", "data.clip.width=16",
                             "training.val_clips=6", "data.augment.axes=true", "data.thick.factor=4")
    clips = val_clips_of([short], config, Interpolation("cubic"))
    assert [clip["volume_id"] for clip in clips] == ["phantom", "phantom:axis1:phase0", "phantom:axis2:phase0"] * 2
    for clip in clips:
        frames, rows, cols = clip["thin"].shape[2:]
        assert clip["interp"].shape == clip["thin"].shape and clip["thick"].shape[2] * 4 == frames
        assert rows <= 16 and cols <= 16
        if clip["volume_id"] != "phantom":
            assert frames == 16 and 13 in (rows, cols)  # a long stretch; the short axis clamps the tile
    assert [tuple(clip["thin"].shape[2:]) for clip in val_clips_of([short], training_config(
        "data.clip.frames=16", "data.clip.height=16", "data.clip.width=16", "training.val_clips=2"), None)] == [
        (12, 16, 16)] * 2  # without data.augment.axes: the volume's own z only (its 3 whole slabs)


def test_validation_scores_a_whole_val_view_as_the_evaluate_step_scores_it(tmp_path):
    from ctv2v.evaluate.evaluate import MODEL, evaluate_volume
    from ctv2v.models.v2v import build_model
    from ctv2v.models.vae import build_untrained_vae
    from ctv2v.device import resolve_precision
    from ctv2v.train.validation import scored_val_views, val_clips_of, validate_diffusion

    config = training_config(*BRIDGE, "v2v.consistent_interpolation=true", "evaluation.data_consistency=true",
                             "training.val_scored_views=1",
                             "training.val_sample_steps=1",
                             "evaluation.sample_steps=1", "evaluation.write_nifti=false")
    torch.manual_seed(0)
    model = build_model(config, build_untrained_vae(config)).eval()
    val = phantom_volume((21, 24, 28))
    cpu = torch.device("cpu")
    metrics = validate_diffusion(model, val_clips_of([val], config, model.interpolation),
                                 scored_val_views([val], config), None, config, cpu, resolve_precision("fp32", cpu))
    report = evaluate_volume(model, val, config, tmp_path, torch.Generator(cpu).manual_seed(config.seed), "stand-in")
    scores = report.metrics[MODEL]["synthesized"]
    assert metrics["val_psnr_db_synthesized"] == pytest.approx(scores["psnr_db"], abs=1e-4)
    assert metrics["val_interp_psnr_db_synthesized"] == pytest.approx(
        report.metrics["cubic+dc"]["synthesized"]["psnr_db"], abs=1e-4)


def test_a_val_view_too_small_to_score_is_one_error_naming_it_and_the_key():
    from ctv2v.train.loop import TrainingError
    from ctv2v.train.validation import scored_val_views

    with pytest.raises(TrainingError, match=r"val view phantom: 9 covered slices x 24 x 28 is smaller than SSIM's "
                                            r"11-voxel window; lower training.val_scored_views"):
        scored_val_views([phantom_volume((12, 24, 28))], training_config("training.val_scored_views=1"))


# ------------------------------------------------------------------------------------ fix 2, 3: the VAE
def test_vae_validation_loss_and_psnr_score_the_same_reconstruction():
    from ctv2v.device import resolve_precision
    from ctv2v.evaluate.metrics import score_volume
    from ctv2v.train.validation import validate_vae
    from ctv2v.models.vae import ScratchVAE

    config = training_config()
    vae = ScratchVAE([8, 16], 4, 1, 4).eval()
    with torch.no_grad():  # a decoder whose output overshoots [0, 1]
        vae.autoencoder.decoder[-1].conv.bias.fill_(3.0)
    thin = torch.from_numpy(Intensity().to_unit(phantom_volume((16, 16, 16)).thin))[None, None]
    metrics = validate_vae(vae, [{"thin": thin}], config, torch.device("cpu"), resolve_precision("fp32",
                                                                                                 torch.device("cpu")))
    with torch.no_grad():
        recon = vae.decode(vae.encode(thin), (16, 16, 16)).clamp(0, 1)
    assert metrics["val_loss"] == pytest.approx(float((recon - thin).abs().mean()), rel=1e-5)
    scores = score_volume(Intensity().to_hu(recon[0, 0].numpy()), Intensity().to_hu(thin[0, 0].numpy()), 4,
                          -1000, 1000)
    assert metrics["val_psnr_db_all"] == pytest.approx(scores["all"]["psnr_db"], rel=1e-5)


def test_scratch_vae_trains_its_deterministic_path():
    from ctv2v.train.objectives import ScratchVAEObjective
    from ctv2v.models.vae import ScratchVAE, kl_divergence

    vae = ScratchVAE([8, 16], 4, 1, 4)
    thin = torch.from_numpy(Intensity().to_unit(phantom_volume((16, 16, 16)).thin))[None, None]
    _, logvar = vae.encode_posterior(thin)
    assert float(torch.exp(0.5 * logvar.detach()).max()) < 0.05, "the decoder must start from (almost) the posterior mean"
    mu = torch.zeros(2, 4, 3, 5, 5)
    # Per latent value: the same KL for a latent of any size.
    assert float(kl_divergence(mu + 1, mu)) == pytest.approx(0.5)
    assert float(kl_divergence(torch.ones(1, 4, 9, 9, 9), torch.zeros(1, 4, 9, 9, 9))) == pytest.approx(0.5)
    _, parts = ScratchVAEObjective(vae, 1e-4)({"thin": thin})
    assert float(parts["posterior_std"]) < 0.05


# ------------------------------------------------------------------------------------ fix 4: sampling
def test_v_prediction_sampling_through_a_perfect_denoiser_returns_the_latent():
    diffusion = Diffusion(DiffusionConfig(prediction_type="v_prediction"))
    x0 = torch.randn(1, 4, 4, 6, 6, generator=torch.Generator().manual_seed(0))

    def perfect(x, t):
        ab = diffusion.alpha_bar(t).view(-1, 1, 1, 1, 1)
        noise = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return diffusion.target(x0, noise, t)

    sampled = diffusion.sample(perfect, tuple(x0.shape), 10, torch.device("cpu"), torch.Generator().manual_seed(1))
    torch.testing.assert_close(sampled, x0, atol=1e-3, rtol=0)


def test_flow_from_the_interpolation_latent_through_a_perfect_denoiser_returns_the_latent():
    diffusion = Diffusion(DiffusionConfig(scheduler="rflow", prediction_type="v_prediction", source="interpolation"))
    x0, source = torch.randn(2, 1, 4, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4):
        sampled = diffusion.sample(lambda x, t: x0 - source, tuple(x0.shape), steps, torch.device("cpu"),
                                   source=source)
        torch.testing.assert_close(sampled, x0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="source latent"):
        diffusion.sample(lambda x, t: x, tuple(x0.shape), 2, torch.device("cpu"))


# ------------------------------------------------------------------------------------ the design
def test_design_settings_are_validated():
    from ctv2v.config import ConfigError

    with pytest.raises(ConfigError, match="source 'interpolation'.*rflow"):
        training_config("diffusion.source=interpolation")
    with pytest.raises(ConfigError, match="v2v.residual"):
        training_config("v2v.residual=true")


def bridge_model(*overrides: str):
    from ctv2v.models.v2v import build_model
    from ctv2v.models.vae import ScratchVAE

    config = training_config(*BRIDGE, *overrides)
    torch.manual_seed(0)
    return config, build_model(config, ScratchVAE.from_config(config.vae.scratch)).eval()


@pytest.mark.parametrize("consistent", [False, True])
def test_untrained_model_with_residual_decoding_returns_the_interpolation_exactly(consistent):
    from ctv2v.evaluate.evaluate import predict_volume

    config, model = bridge_model(f"v2v.consistent_interpolation={str(consistent).lower()}")
    volume = phantom_volume((13, 16, 16))
    interpolated = Interpolation("cubic", consistent).of(volume)
    assert model.interpolation == Interpolation("cubic", consistent)
    tile = eval_tiles(volume.thin.shape, config.data.clip, 4, volume.thick.array.shape[0])[0]
    clip = {k: torch.from_numpy(v)[None, None] for k, v in extract_clip(volume, tile, Intensity(), interpolated).items()}
    out = model.sample(clip["thick"], steps=3, interp=clip["interp"])
    assert torch.equal(out, clip["interp"])
    prediction = predict_volume(model, volume, config, torch.Generator().manual_seed(0))
    covered = covered_slices(volume.thick)
    # The volume a user gets keeps the input's full HU range (the phantom's air reaches below the window).
    assert interpolated[:covered].min() < -1000
    np.testing.assert_allclose(prediction, interpolated[:covered], atol=1e-3)


def test_training_and_sampling_condition_on_the_same_latent():
    """Fix 5: the loss and sample() encode a clip's condition by one path (the per-clip interpolation latent)."""
    config, model = bridge_model()
    volume = phantom_volume((13, 16, 16))
    tile = eval_tiles(volume.thin.shape, config.data.clip, 4, volume.thick.array.shape[0])[0]
    clip = {k: torch.from_numpy(v)[None, None]
            for k, v in extract_clip(volume, tile, Intensity(), Interpolation("cubic").of(volume)).items()}
    seen = []
    hook = model.denoiser.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    model.loss(clip["thick"], clip["thin"], interp=clip["interp"])
    model.sample(clip["thick"], steps=1, interp=clip["interp"])
    hook.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    torch.testing.assert_close(seen[0], model.vae.encode(clip["interp"]))
    with pytest.raises(ValueError, match="interp"):
        model.sample(clip["thick"], steps=1)


def test_image_loss_scores_the_output_one_step_sampling_makes_and_trains_the_denoiser():
    """training.image_loss_weight compares the thin clip with what sample() would output (before clamping) for the
    prediction; here, untrained and at t = T, that is the interpolation itself. Its gradient reaches the denoiser."""
    config, model = bridge_model("diffusion.sample_steps=1", "diffusion.train_timesteps=sampled",
                                 "training.val_sample_steps=null", "training.image_loss_weight=2.0")
    volume = phantom_volume((13, 16, 16))
    tile = eval_tiles(volume.thin.shape, config.data.clip, 4, volume.thick.array.shape[0])[0]
    clip = {k: torch.from_numpy(v)[None, None]
            for k, v in extract_clip(volume, tile, Intensity(), Interpolation("cubic").of(volume)).items()}
    model.train()
    loss, parts = model.loss(clip["thick"], clip["thin"], interp=clip["interp"])
    expected = torch.nn.functional.mse_loss(clip["interp"].float(), clip["thin"].float())
    torch.testing.assert_close(parts["image_mse"], expected)
    torch.testing.assert_close(loss, parts["diffusion"] + 2.0 * expected)
    loss.backward()
    trained = [p for p in model.denoiser.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all(p.grad is None for p in model.vae.parameters())


def test_image_loss_needs_the_flow_and_the_clips():
    from ctv2v.config import ConfigError

    with pytest.raises(ConfigError, match="decodes the rectified flow's x0 estimate"):
        training_config("training.image_loss_weight=1.0", "training.latent_cache=false")
    with pytest.raises(ConfigError, match="compares decoded clips with the thin clips"):
        training_config(*BRIDGE[:2], "training.image_loss_weight=1.0", "training.latent_cache=true")


def test_tiny_end_to_end_run_improves_on_its_first_validation(tmp_path):
    """train-vae, then the frozen phase of the flow from the interpolation: val loss falls below its first value."""
    from ctv2v.steps.train_vae import train_vae_step
    from ctv2v.data.clips import TrainClips
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.device import resolve_precision
    from ctv2v.models.v2v import build_model
    from ctv2v.train.loop import TrainJob, train_loop
    from ctv2v.train.objectives import DiffusionObjective
    from ctv2v.train.validation import fixed_val_clips, scored_val_views, validate_diffusion
    from ctv2v.models.vae import load_vae_artifact

    torch.set_flush_denormal(True)  # as the steps do (ctv2v.train.loop.runtime_from_env): denormals are ~15x slower
    config = training_config(*BRIDGE, "vae.scratch.epochs=2", "vae.scratch.lr=3e-3", "data.clip.clips_per_volume=4",
                             "training.val_sample_steps=1")
    data = prepared_phantoms(tmp_path, config, 4, TRAINING_PHANTOM)
    train_vae_step(config, data, tmp_path / "vae")
    cpu, intensity = torch.device("cpu"), Intensity.from_config(config.data.intensity)
    torch.manual_seed(0)
    model = build_model(config, load_vae_artifact(tmp_path / "vae"))
    val_clips = fixed_val_clips(load_split_volumes(data, config, "val"), config.data.clip, intensity, 2,
                                model.interpolation)
    val_views = scored_val_views(load_split_volumes(data, config, "val"), config)
    assert len(val_views) == 1
    precision = resolve_precision("fp32", cpu)
    history, best = [], []

    def validate(ema):
        history.append(validate_diffusion(model, val_clips, val_views, ema, config, cpu, precision))
        return history[-1]

    train_loop(TrainJob(
        name="frozen", config=config, objective=DiffusionObjective(model),
        param_groups=model.param_groups(3e-3, 0.0, 0.0), warmup_steps=0, epochs=4, batch_size=2,
        train_set=TrainClips(load_split_volumes(data, config, "train"), config.data.clip, intensity, config.seed,
                             model.interpolation),
        states={"denoiser": model.denoiser}, out_dir=tmp_path / "frozen", device=cpu, precision=precision,
        validate=validate, on_best=lambda ema: best.append(len(history) - 1)))
    assert len(history) == 4
    curve = [(round(h["val_loss"], 5), round(h["val_psnr_db_synthesized"], 3)) for h in history]
    # The whole val volume predicted as evaluate predicts it is scored beside its start, and its PSNR picks
    # best-model: each save is a new highest PSNR, whatever the flow's loss on held-out clips did.
    psnrs = [h["val_psnr_db_synthesized"] for h in history]
    assert best == [i for i, value in enumerate(psnrs) if value > max(psnrs[:i], default=-np.inf)], curve
    # On these smooth phantoms its PSNR moves by hundredths of a dB in so few steps, so it only must not fall.
    assert history[-1]["val_loss"] < 0.9 * history[0]["val_loss"], curve
    assert history[-1]["val_psnr_db_synthesized"] > history[0]["val_psnr_db_synthesized"] - 0.05, curve
