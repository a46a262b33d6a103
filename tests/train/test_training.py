"""The training steps: device/precision choice, the frozen and full phases, checkpoints, the trained-model folder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from ctv2v.device import DeviceError, arch_runs_on, check_gpu_supported, resolve_precision, select_device
from tests.conftest import TRAINING_PHANTOM, prepared_phantoms, training_config


# ------------------------------------------------------------------------------------- device, precision
CUDA_126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
"""torch.cuda.get_arch_list() of PyTorch's CUDA 12.6 wheels."""
CUDA_128_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
"""The CUDA 12.8 wheels dropped Volta."""


def test_v100_needs_a_build_with_sm70_kernels():
    check_gpu_supported(CUDA_126_ARCHS, (7, 0), "Tesla V100-SXM2-32GB")
    with pytest.raises(DeviceError, match=r"Tesla V100-SXM2-32GB \(sm_70\).*cu126"):
        check_gpu_supported(CUDA_128_ARCHS, (7, 0), "Tesla V100-SXM2-32GB", torch_version="2.13.0+cu128")
    with pytest.raises(DeviceError, match="no GPU arch"):
        check_gpu_supported([], (8, 0), "A100")


def test_arch_compatibility_follows_cuda_rules():
    assert arch_runs_on("sm_80", (8, 6))  # same major, older minor cubin runs
    assert not arch_runs_on("sm_86", (8, 0))
    assert not arch_runs_on("sm_80", (9, 0))  # cubins do not cross majors
    assert arch_runs_on("compute_80", (9, 0))  # PTX is JIT-compiled forward
    assert not arch_runs_on("compute_90", (8, 6))
    assert arch_runs_on("sm_90a", (9, 0)) and not arch_runs_on("sm_90a", (10, 0))


def test_precision_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu).autocast_dtype is None
    v100_auto = resolve_precision("auto", cuda, bf16_supported=False)
    assert (v100_auto.autocast_dtype, v100_auto.grad_scaler) == (torch.float16, True)
    assert resolve_precision("bf16", cuda, bf16_supported=True).autocast_dtype == torch.bfloat16
    with pytest.raises(DeviceError, match="bf16.*V100"):
        resolve_precision("bf16", cuda, bf16_supported=False)
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    assert select_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda was requested"):
            select_device("cuda")


# ------------------------------------------------------------------------------------------ the steps
PIPELINE_RUN_ID = "test-training-steps"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_server):
    """train-vae, then train --phase frozen, then --phase full, on phantom volumes, tracked in a real MLflow."""
    from ctv2v.steps.train import train_step
    from ctv2v.steps.train_vae import train_vae_step

    root = tmp_path_factory.mktemp("steps")
    config = training_config("training.ema_decay=0.9", f"tracking.tracking_uri={mlflow_server.uri}",
                         "tracking.experiment=test-training", "tracking.system_metrics_interval_s=null")
    data = prepared_phantoms(root / "data", config, volumes=4, shape=TRAINING_PHANTOM)
    vae_summary = train_vae_step(config, data, root / "vae", pipeline_run_id=PIPELINE_RUN_ID)
    frozen_summary = train_step(config, "frozen", data, root / "vae", None, root / "frozen",
                                pipeline_run_id=PIPELINE_RUN_ID)
    full_summary = train_step(config, "full", data, root / "vae", root / "frozen", root / "full",
                              pipeline_run_id=PIPELINE_RUN_ID)
    return {"root": root, "config": config, "data": data, "mlflow": mlflow_server,
            "summaries": (vae_summary, frozen_summary, full_summary)}


def test_each_step_is_a_tagged_mlflow_run_with_params_metrics_and_models(trained):
    from mlflow import MlflowClient

    from ctv2v.config_io import flatten

    client = MlflowClient(trained["mlflow"].uri)
    experiment = client.get_experiment_by_name("test-training")
    runs = {run.data.tags["ctv2v.step"]: run for run in client.search_runs(
        [experiment.experiment_id], f"tags.`ctv2v.pipeline_run_id` = '{PIPELINE_RUN_ID}'")
        if run.data.tags.get("ctv2v.run_role") == "step"}
    assert set(runs) == {"train-vae", "train-frozen", "train-full"}
    frozen = runs["train-frozen"]
    assert frozen.info.status == "FINISHED"
    assert (frozen.data.tags["ctv2v.variant"], frozen.data.tags["ctv2v.phase"],
            frozen.data.tags["ctv2v.weights"]) == ("main", "frozen", "scratch")
    assert frozen.data.params == {k: v for k, v in flatten(trained["config"]).items()}
    steps = trained["summaries"][1].global_step
    for key in ("frozen/loss", "frozen/diffusion", "frozen/grad_norm", "frozen/clips_per_s", "frozen/lr/denoiser"):
        assert [m.step for m in client.get_metric_history(frozen.info.run_id, key)] == list(range(1, steps + 1)), key
    for key in ("frozen/val_loss", "frozen/val_psnr_db_synthesized", "frozen/val_ssim_2d_synthesized"):
        assert len(client.get_metric_history(frozen.info.run_id, key)) == trained["config"].training.frozen.epochs
    artifacts = {a.path for a in client.list_artifacts(frozen.info.run_id)}
    assert {"model", "best-model"} <= artifacts
    assert {a.path for a in client.list_artifacts(frozen.info.run_id, "model")} >= {
        "model/denoiser.pt", "model/model.json", "model/vae"}
    assert "full/recon_l1" in client.get_run(runs["train-full"].info.run_id).data.metrics
    assert {a.path for a in client.list_artifacts(runs["train-vae"].info.run_id, "vae")} == {"vae/vae.json",
                                                                                            "vae/vae.pt"}
    # Each training run names its training data: the manifest as a dataset input, its sha256 as the digest.
    manifest_sha256 = hashlib.sha256((trained["data"] / "manifest.json").read_bytes()).hexdigest()
    for step in ("train-vae", "train-frozen", "train-full"):
        [dataset_input] = client.get_run(runs[step].info.run_id).inputs.dataset_inputs
        assert manifest_sha256.startswith(dataset_input.dataset.digest) and len(dataset_input.dataset.digest) >= 32
        assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "training")}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_train_vae_writes_a_loadable_scratch_vae_artifact(trained):
    from ctv2v.models.vae import load_vae_artifact

    vae_dir = trained["root"] / "vae"
    vae = load_vae_artifact(vae_dir)
    assert vae.kind == "scratch" and vae.weights_label == "scratch"
    assert float(vae.latent_scale) == pytest.approx(trained["summaries"][0].latent_scale)
    assert float(vae.latent_scale) != 1.0  # estimated on training latents, not the default
    assert (vae_dir / "resolved-config.yaml").is_file()


def test_frozen_phase_trains_the_denoiser_and_leaves_the_vae_bitwise_unchanged(trained):
    root = trained["root"]
    given, saved = _tensors(root / "vae" / "vae.pt"), _tensors(root / "frozen" / "model" / "vae" / "vae.pt")
    assert given.keys() == saved.keys()
    assert all(torch.equal(given[k], saved[k]) for k in given)
    checkpoint = _tensors(next((root / "frozen" / "checkpoints").glob("step-*.pt")))
    assert "vae" not in checkpoint["states"]
    in_optimizer = sum(len(g["params"]) for g in checkpoint["states"]["optimizer"]["param_groups"])
    assert in_optimizer == len(checkpoint["states"]["denoiser"])  # every denoiser tensor, nothing else
    assert trained["summaries"][1].global_step > 0


def test_full_phase_fine_tunes_the_vae_from_the_frozen_model(trained):
    import json

    root = trained["root"]
    before, after = _tensors(root / "vae" / "vae.pt"), _tensors(root / "full" / "model" / "vae" / "vae.pt")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    meta = json.loads((root / "full" / "model" / "model.json").read_text())
    assert meta["vae_weights"] == "scratch, fine-tuned (full phase)"
    assert meta["denoiser_weights"] == "ema (decay 0.9)"
    assert "full/recon_l1" in trained["summaries"][2].metrics


def test_trained_model_folder_loads_strictly(trained, tmp_path):
    from ctv2v.models.artifacts import load_trained_model
    from ctv2v.models.weights import CheckpointError

    config = trained["config"]
    model_dir = trained["root"] / "full" / "model"
    model = load_trained_model(model_dir, config)
    assert model.vae.weights_label == "scratch, fine-tuned (full phase)"  # what evaluation reports
    saved = _tensors(model_dir / "denoiser.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.denoiser.state_dict().items())
    thick = torch.rand(1, 1, config.data.clip.frames // 4, config.data.clip.height, config.data.clip.width)
    thin = model.sample(thick, steps=2)
    assert thin.shape == (1, 1, config.data.clip.frames, config.data.clip.height, config.data.clip.width)
    with pytest.raises(CheckpointError, match="denoiser=.*but the config has"):
        load_trained_model(model_dir, training_config("denoiser.channels=[8,8]"))


def test_a_missing_or_broken_vae_is_one_clear_error_and_writes_nothing(trained, tmp_path):
    from ctv2v.steps.train import train_step
    from ctv2v.models.weights import CheckpointError

    config, data = trained["config"], trained["data"]
    with pytest.raises(CheckpointError, match="VAE folder does not exist"):
        train_step(config, "frozen", data, tmp_path / "nowhere", None, tmp_path / "out1")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vae.json").write_text((trained["root"] / "vae" / "vae.json").read_text())
    (broken / "vae.pt").write_bytes((trained["root"] / "vae" / "vae.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"not a usable VAE artifact: .*vae\.pt: sha256"):
        train_step(config, "frozen", data, broken, None, tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_latent_cache_crops_are_the_aligned_crops_of_the_volume_latents(trained):
    from ctv2v.data.clips import TrainClips
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.intensity import Intensity
    from ctv2v.data.latents import LatentClips, encode_training_volumes
    from ctv2v.models.vae import load_vae_artifact

    config = trained["config"]
    vae = load_vae_artifact(trained["root"] / "vae")
    volumes = load_split_volumes(trained["data"], config, "train")
    intensity = Intensity.from_config(config.data.intensity)
    latents = encode_training_volumes(vae, volumes, config.data.clip, intensity, torch.device("cpu"))
    clips = LatentClips(latents, config.data.clip, vae.factors, config.data.thick.factor, config.seed)
    image_clips = TrainClips(volumes, config.data.clip, intensity, config.seed)
    assert len(clips) == len(image_clips)
    frames, height, width = config.data.clip.frames, config.data.clip.height, config.data.clip.width
    step = (config.data.thick.factor * vae.depth_factor, vae.spatial_factor, vae.spatial_factor)
    origins = set()
    for epoch in range(3):
        clips.set_epoch(epoch)
        for index in range(len(clips)):
            item = clips[index]
            z, y, x = item["origin"].tolist()
            origins.add((index, z, y, x))
            assert (z % step[0], y % step[1], x % step[2]) == (0, 0, 0)
            source = latents[index // config.data.clip.clips_per_volume]
            fd, fs = vae.depth_factor, vae.spatial_factor
            assert torch.equal(item["thin_latent"], source.thin[:, z // fd:(z + frames) // fd,
                                                                 y // fs:(y + height) // fs, x // fs:(x + width) // fs])
            assert item["thin_latent"].shape[1:] == vae.latent_shape((1, 1, frames, height, width))[2:]
            assert item["thick_latent"].shape[1] == frames // config.data.thick.factor // fd
    assert len(origins) > len(clips)  # crops move between epochs
    # Where a crop needs no context beyond itself (the tile is the whole volume), cached == per-clip encoding.
    thin = torch.from_numpy(intensity.to_unit(volumes[0].thin))
    whole = vae.encode(thin[None, None])[0]
    assert torch.allclose(latents[0].thin[:, :whole.shape[1], :whole.shape[2], :whole.shape[3]], whole, atol=1e-5)


def test_tiled_volume_encoding_is_aligned_with_whole_volume_encoding(trained):
    from ctv2v.data.latents import encode_volume
    from ctv2v.models.vae import load_vae_artifact

    vae = load_vae_artifact(trained["root"] / "vae")
    volume = torch.rand(24, 48, 48)  # white noise: a latent one voxel off shares nothing with the right one
    with torch.no_grad():
        whole = vae.encode(volume[None, None])[0]
    tiled = encode_volume(vae, volume, (16, 32, 32))  # 16-slice, 32-pixel tiles: several in every axis
    assert tiled.shape == whole.shape
    # Tiles lose context only at their borders (4 of 32 pixels overlap here); a misplaced tile would be off
    # everywhere, like a shifted latent.
    error = (tiled - whole).abs().mean()
    shifted = (torch.roll(whole, 1, dims=3) - whole).abs().mean()
    assert error < 0.5 * shifted


def test_cached_epochs_never_run_the_vae_encoder(trained, tmp_path):
    from ctv2v.data.clips import TrainClips
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.intensity import Intensity
    from ctv2v.models.v2v import build_model
    from ctv2v.data.latents import LatentClips, encode_training_volumes
    from ctv2v.train.loop import TrainJob, train_loop
    from ctv2v.train.objectives import DiffusionObjective
    from ctv2v.models.vae import load_vae_artifact

    config, cpu = trained["config"], torch.device("cpu")
    intensity = Intensity.from_config(config.data.intensity)
    volumes = load_split_volumes(trained["data"], config, "train")
    model = build_model(config, load_vae_artifact(trained["root"] / "vae"))
    latents = encode_training_volumes(model.vae, volumes, config.data.clip, intensity, cpu)
    encoder_calls = []
    model.vae.autoencoder.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    datasets = {
        "cached": LatentClips(latents, config.data.clip, model.vae.factors, config.data.thick.factor, config.seed),
        "per-batch": TrainClips(volumes, config.data.clip, intensity, config.seed),
    }
    calls = {}
    for name, dataset in datasets.items():
        encoder_calls.clear()
        result = train_loop(TrainJob(
            name="frozen", config=config, objective=DiffusionObjective(model),
            param_groups=model.param_groups(1e-4, 0.0, 0.0), train_set=dataset, epochs=1, batch_size=2,
            warmup_steps=0, states={"denoiser": model.denoiser}, out_dir=tmp_path / name, device=cpu,
            precision=resolve_precision("auto", cpu)))
        calls[name] = len(encoder_calls)
    assert calls["cached"] == 0
    assert calls["per-batch"] == 2 * result.global_step  # thin and thick clip of every batch


def test_a_diverging_run_stops_naming_phase_epoch_and_last_finite_loss_and_keeps_its_checkpoint(trained, tmp_path):
    from ctv2v.steps.train import train_step
    from ctv2v.train.loop import TrainingError

    config = trained["config"].model_copy(deep=True)
    config.training.frozen.lr = 1e30  # finite, but after the first update the forward pass overflows
    out = tmp_path / "diverged"
    with pytest.raises(TrainingError) as stopped:
        train_step(config, "frozen", trained["data"], trained["root"] / "vae", None, out)
    assert re.fullmatch(rf"frozen: diverged at epoch 1/1, step 2: loss is nan; last finite loss \d\.\d+ \(step 1\); "
                        rf"last checkpoint kept: {re.escape(str(out))}/checkpoints/step-00000001.pt",
                        str(stopped.value)), str(stopped.value)
    assert (out / "checkpoints" / "step-00000001.pt").is_file()
    assert not (out / "resolved-config.yaml").exists()  # a failed step leaves no config posing as output
