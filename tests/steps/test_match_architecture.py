"""Strict MAISI VAE loading: architecture inference, key rewrites, clear failures, and the match-architecture step.

No network: every checkpoint here is saved from a freshly built AutoencoderKlMaisi (random values with the
layout under test), i.e. a stand-in, never NVIDIA's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL, UNet

from ctv2v.config_io import load_config
from ctv2v.data.prepared import load_split_volumes, prepare_data
from ctv2v.intensity import Intensity
from ctv2v.models.maisi import (MAISI_CT_ARCH, ArchitectureMismatchError, CheckpointFormatError, build_autoencoder,
                         infer_arch, load_maisi_checkpoint)
from ctv2v.train.validation import fixed_val_clips
from ctv2v.models.vae import load_vae_artifact
from ctv2v.steps.fetch_checkpoint import fetch_checkpoint_step
from ctv2v.steps.match_architecture import REPORT_NAME, ReconstructionCheckError, match_architecture_step

REPO = Path(__file__).resolve().parents[2]
TINY = {**MAISI_CT_ARCH, "num_channels": [8, 16, 32], "norm_num_groups": 8}
"""MAISI's layout with small channels, for the cases whose point is not the real size."""


class NotATensor:
    """A custom class: unpickling an instance needs this module's code."""

    def __init__(self):
        self.weights = torch.zeros(2)


def fresh(arch: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_autoencoder(arch).eval()


def save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, shape=(1, 1, 8, 16, 16)) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    mu_a, sigma_a = a.encode(x)
    mu_b, sigma_b = b.encode(x)
    assert torch.equal(mu_a, mu_b) and torch.equal(sigma_a, sigma_b)
    assert torch.equal(a.decode(mu_a), b.decode(mu_b))


def test_maisi_ct_checkpoint_loads_130_of_130_with_identical_outputs(tmp_path):
    original = fresh(MAISI_CT_ARCH)
    path = save(original.state_dict(), tmp_path / "autoencoder.pt")
    model, report = load_maisi_checkpoint(path)
    assert (report.loaded, report.total) == (130, 130) and report.complete and not report.partial
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatched == {}
    assert report.arch == MAISI_CT_ARCH
    assert "130/130 tensors loaded" in report.summary()
    assert_same_outputs(original, model.eval())


@pytest.mark.parametrize("changes", [
    {"num_channels": [8, 16, 32]},
    {"num_channels": [8, 16, 32], "num_res_blocks": [1, 1, 1]},
    {"num_channels": [8, 16, 32], "latent_channels": 8},
    {"num_channels": [8, 32], "num_res_blocks": [1, 3], "attention_levels": [False, False], "in_channels": 2,
     "out_channels": 3},
    {"num_channels": [8, 16, 16], "attention_levels": [False, False, True], "with_encoder_nonlocal_attn": True,
     "with_decoder_nonlocal_attn": True, "include_fc": True, "use_combined_linear": False},
    {"num_channels": [8, 16], "num_res_blocks": [2, 1], "attention_levels": [True, False], "include_fc": False,
     "use_combined_linear": True},
])
def test_variants_are_inferred(changes, tmp_path):
    arch = {**MAISI_CT_ARCH, **changes, "norm_num_groups": 8}
    original = fresh(arch)
    assert infer_arch(original.state_dict()) == arch
    model, report = load_maisi_checkpoint(save(original.state_dict(), tmp_path / "v.pt"))
    assert report.complete and report.loaded == report.total == len(original.state_dict())


def test_norm_num_groups_is_maisis_32_when_it_divides_else_the_largest_common_divisor():
    assert infer_arch(fresh({**TINY, "num_channels": [32, 64, 128], "norm_num_groups": 32}).state_dict())[
        "norm_num_groups"] == 32
    assert infer_arch(fresh({**TINY, "num_channels": [24, 48], "norm_num_groups": 8,
                             "num_res_blocks": [1, 1], "attention_levels": [False, False]}).state_dict())[
        "norm_num_groups"] == 24


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 273},
    lambda sd: {"model": sd, "optimizer": {"lr": 1e-4}},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
], ids=["state_dict", "model", "module-prefix", "state_dict+module-prefix"])
def test_wrapped_checkpoints_load(wrap, tmp_path):
    original = fresh(TINY)
    model, report = load_maisi_checkpoint(save(wrap(original.state_dict()), tmp_path / "w.pt"))
    assert report.complete and report.key_notes
    assert_same_weights(original, model)


def test_pre_monai_14_key_names_load(tmp_path):
    original = fresh(MAISI_CT_ARCH)
    # Before MONAI 1.4 the block convolutions were bare Convolutions: one `.conv` fewer in every block conv key.
    legacy = {}
    for key, value in original.state_dict().items():
        if key.startswith(("encoder.blocks.", "decoder.blocks.")) and key.endswith((".conv.conv.weight",
                                                                                    ".conv.conv.bias")):
            key = key[: -len(".conv.weight" if key.endswith("weight") else ".conv.bias")] + key[key.rindex("."):]
        legacy[key] = value
    assert "encoder.blocks.0.conv.weight" in legacy and "encoder.blocks.1.conv1.conv.weight" in legacy
    assert "encoder.blocks.3.conv.conv.weight" in legacy  # a downsampler: conv.conv.conv -> conv.conv
    renamed = sum(1 for k in legacy if k not in original.state_dict())
    model, report = load_maisi_checkpoint(save(legacy, tmp_path / "legacy.pt"))
    assert report.complete and report.loaded == 130
    assert any(f"renamed {renamed} pre-MONAI-1.4 keys" in note for note in report.key_notes)
    assert_same_weights(original, model)


def test_truncated_file_is_refused_by_name(tmp_path):
    path = save(fresh(TINY).state_dict(), tmp_path / "t.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match=rf"{path}: not a readable VAE checkpoint \(truncated"):
        load_maisi_checkpoint(path)


def test_pickle_that_needs_code_is_refused(tmp_path):
    path = save({"weights": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointFormatError, match=rf"{path}: refused as VAE checkpoint: unpickling it would import "
                                                    r"\S*NotATensor \(code, not tensors\)") as refused:
        load_maisi_checkpoint(path)
    assert "weights_only" not in str(refused.value)


def test_generic_autoencoderkl_is_not_maisi(tmp_path):
    generic = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 16),
                            latent_channels=4, num_res_blocks=(1, 1, 1), norm_num_groups=8,
                            attention_levels=(False, False, True))
    path = save(generic.state_dict(), tmp_path / "generic.pt")
    with pytest.raises(ArchitectureMismatchError, match=rf"{path}: not an AutoencoderKlMaisi state dict.*generic "
                                                        r"AutoencoderKL.*attention blocks"):
        load_maisi_checkpoint(path)


def test_unet_is_not_maisi(tmp_path):
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,))
    with pytest.raises(ArchitectureMismatchError, match=r"not an AutoencoderKlMaisi state dict: no \[encoder"):
        load_maisi_checkpoint(save(unet.state_dict(), tmp_path / "unet.pt"))


def test_one_changed_shape_is_named_and_refused_unless_partial_is_allowed(tmp_path):
    state = fresh(MAISI_CT_ARCH).state_dict()
    name = "encoder.blocks.4.conv2.conv.conv.weight"
    state[name] = torch.zeros(128, 128, 3, 3, 1)
    path = save(state, tmp_path / "bad.pt")
    with pytest.raises(ArchitectureMismatchError) as info:
        load_maisi_checkpoint(path)
    message = str(info.value)
    assert "129/130 tensors loaded" in message and "refusing a partial load" in message
    assert f"shape mismatch: {name}: checkpoint [128, 128, 3, 3, 1] vs network [128, 128, 3, 3, 3]" in message
    assert info.value.report.shape_mismatched == {name: {"checkpoint": [128, 128, 3, 3, 1],
                                                         "model": [128, 128, 3, 3, 3]}}

    model, report = load_maisi_checkpoint(path, allow_partial=True)
    assert report.partial and report.status == "PARTIAL" and report.loaded == 129
    assert all(line.startswith("PARTIAL") for line in report.summary().splitlines())
    assert torch.equal(model.state_dict()["encoder.blocks.4.conv1.conv.conv.weight"],
                       state["encoder.blocks.4.conv1.conv.conv.weight"])


def test_missing_tensor_is_named(tmp_path):
    state = fresh(TINY).state_dict()
    del state["decoder.blocks.4.nin_shortcut.conv.conv.bias"]
    with pytest.raises(ArchitectureMismatchError, match=r"missing: decoder\.blocks\.4\.nin_shortcut\.conv\.conv\.bias"):
        load_maisi_checkpoint(save(state, tmp_path / "m.pt"))


# -------------------------------------------------------------------------------------------- the step
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The real demo CT volumes, prepared with smoke.yaml (32x32 crops, 16 slices)."""
    root = tmp_path_factory.mktemp("prepared")
    prepare_data(load_config([REPO / "configs" / "smoke.yaml"]), root)
    return root


def step_config(*overrides: str):
    return load_config([REPO / "configs" / "pretrained.yaml", REPO / "configs" / "smoke.yaml"],
                       ["vae.latent_scale_clips=2", "vae.maisi.recon_check_clips=1", *overrides])


def test_bad_reconstruction_fails_with_the_normalization_hint(data_dir, tmp_path):
    # Random weights declared as pretrained: the reconstruction check must catch it.
    checkpoint = save(fresh(TINY).state_dict(), tmp_path / "autoencoder.pt")
    out = tmp_path / "vae"
    with pytest.raises(ReconstructionCheckError, match=r"reconstruction PSNR .* dB in HU over \[-1000, 1000\] .* "
                                                       r"floor 25 dB: FAILED.*scaled to \[0, 1\].*\[-1, 1\]"):
        match_architecture_step(step_config(), checkpoint, out, data_dir)
    assert files_under(out) == []


def test_reconstruction_psnr_is_in_hu_over_the_window(data_dir, tmp_path):
    original = fresh(TINY)
    checkpoint = save(original.state_dict(), tmp_path / "autoencoder.pt")
    config = step_config("vae.maisi.recon_psnr_floor_db=-100")
    summary = match_architecture_step(config, checkpoint, tmp_path / "vae", data_dir)
    # Independent computation: decode(mean latent) of the same val clip, compared in HU.
    intensity = Intensity.from_config(config.data.intensity)
    clip = fixed_val_clips(load_split_volumes(data_dir, config, "val"), config.data.clip, intensity, 1)[0]["thin"]
    with torch.no_grad():
        recon = original.decode(original.encode(clip)[0]).clamp(0, 1)
    error_hu = intensity.to_hu(recon.double()) - intensity.to_hu(clip.double())
    expected = 10 * math.log10(2000.0 ** 2 / float(error_hu.pow(2).mean()))
    assert summary.recon_check.psnr_db == pytest.approx(expected, abs=1e-3)
    assert summary.recon_check.status == "passed" and summary.weights == "pretrained"
    # The VAE's ceiling sits beside the interpolation the model starts from, in the report and under the same
    # metric names train-vae uses for the scratch VAE; untrained tiny weights are far below interpolation.
    ceiling = json.loads((tmp_path / "vae" / REPORT_NAME).read_text())["ceiling"]
    assert ceiling == summary.ceiling
    for subset in ("all", "synthesized"):
        assert ceiling[f"val_psnr_db_{subset}"] < ceiling[f"val_interp_psnr_db_{subset}"] - 10
        assert {f"val_ssim_2d_{subset}", f"val_interp_ssim_2d_{subset}"} <= set(ceiling)


def test_step_failures_leave_no_artifact(data_dir, tmp_path):
    state = fresh(TINY).state_dict()
    state["post_quant_conv.conv.bias"] = torch.zeros(5)
    bad = save(state, tmp_path / "bad.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bad.read_bytes()[:1000])
    for checkpoint, error in ((bad, ArchitectureMismatchError), (truncated, CheckpointFormatError)):
        out = tmp_path / f"out-{checkpoint.stem}"
        with pytest.raises(error):
            match_architecture_step(step_config(), checkpoint, out, data_dir)
        assert files_under(out) == []


def test_partial_step_labels_every_output(data_dir, tmp_path, caplog):
    state = fresh(TINY).state_dict()
    state["post_quant_conv.conv.bias"] = torch.zeros(5)
    checkpoint = save(state, tmp_path / "bad.pt")
    config = step_config("vae.maisi.allow_partial=true", "vae.maisi.recon_psnr_floor_db=-100")
    summary = match_architecture_step(config, checkpoint, tmp_path / "vae", data_dir)
    assert summary.load == "PARTIAL" and (summary.match.loaded, summary.match.total) == (129, 130)
    assert "PARTIAL" in summary.recon_check.status
    meta = json.loads((tmp_path / "vae" / "vae.json").read_text())
    assert meta["extra"]["load"] == "PARTIAL" and meta["extra"]["match"]["status"] == "PARTIAL"
    step_lines = [r.getMessage() for r in caplog.records
                  if r.name.startswith(("ctv2v.steps.match", "ctv2v.models.maisi"))]
    assert step_lines and all("PARTIAL" in line for line in step_lines)


def test_fetch_record_and_config_must_agree_on_weights(data_dir, tmp_path):
    fetch_checkpoint_step(step_config("vae.maisi.weights=stand-in"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="fetch record says weights 'stand-in' but vae.maisi.weights is 'pretrained'"):
        match_architecture_step(step_config(), tmp_path / "ckpt", tmp_path / "vae", data_dir)


def test_stand_in_pipeline_command_lines_write_a_labelled_artifact(data_dir, tmp_path, capsys):
    from pipeline.cli import main

    config = step_config("vae.maisi.weights=stand-in")
    fetch_checkpoint_step(config, tmp_path / "ckpt")
    out = tmp_path / "vae"
    # The command line the pipeline runs, from the resolved config the fetch output carries.
    resolved = str(tmp_path / "ckpt" / "resolved-config.yaml")
    argv = ["match", "--config", resolved, "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data_dir),
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "stand-in" and summary["load"] == "strict" and summary["loaded"] == "130/130"
    assert summary["recon_check"]["status"] == "not applicable (stand-in weights)"
    assert summary["recon_check"]["psnr_db"] is None
    report = json.loads((out / REPORT_NAME).read_text())
    assert (report["match"]["loaded"], report["match"]["total"]) == (130, 130)
    assert report["match"]["status"] == "complete"
    meta = json.loads((out / "vae.json").read_text())
    assert meta["weights"] == "stand-in" and meta["extra"]["recon_check"]["status"].startswith("not applicable")
    vae = load_vae_artifact(out, config.vae.maisi)
    assert vae.weights_label == "stand-in"
    assert float(vae.latent_scale) == pytest.approx(summary["latent_scale"]) and summary["latent_scale"] > 0
    assert (out / "resolved-config.yaml").is_file()


def test_cli_match_failure_prints_the_report_and_writes_nothing(data_dir, tmp_path, capsys):
    from pipeline.cli import main

    state = fresh(TINY).state_dict()
    del state["encoder.blocks.0.conv.conv.bias"]
    bad = save(state, tmp_path / "bad.pt")
    assert main(["match", "--config", str(REPO / "configs" / "smoke.yaml"), "--checkpoint", str(bad),
                 "--data", str(data_dir), "--out", str(tmp_path / "bad-out")]) == 1
    err = capsys.readouterr().err
    assert "refusing a partial load" in err and "missing: encoder.blocks.0.conv.conv.bias" in err
    assert files_under(tmp_path / "bad-out") == []
