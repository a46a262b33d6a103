"""The run configuration: every file in configs/ validates; typos and misplaced keys are errors with a hint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ctv2v.config import ConfigError, RunConfig
from ctv2v.config_io import flatten, load_config, to_yaml, write_resolved
from ctv2v.steps.context import component_config
from pipeline.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("files", [
    ["main.yaml"], ["pretrained.yaml"], ["smoke.yaml"],
    ["main.yaml", "smoke.yaml"], ["pretrained.yaml", "smoke.yaml"],
    ["main.yaml", "v100-16gb.yaml"], ["pretrained.yaml", "v100-16gb.yaml"],
    ["main.yaml", "v100-32gb.yaml"], ["pretrained.yaml", "v100-32gb.yaml"],
])
def test_every_shipped_config_validates(files):
    config = load_config([CONFIGS / f for f in files])
    assert config.variant == ("pretrained" if files[0] == "pretrained.yaml" else "main")


def test_main_and_pretrained_differ_only_in_the_vae():
    main = flatten(load_config(CONFIGS / "main.yaml"))
    pretrained = flatten(load_config(CONFIGS / "pretrained.yaml"))
    differing = {k for k in main if main[k] != pretrained[k]}
    assert differing <= {"variant"} | {k for k in main if k.startswith("vae.")}
    assert "variant" in differing


def test_v100_overlays_keep_the_variant_and_set_fp16():
    config = load_config([CONFIGS / "pretrained.yaml", CONFIGS / "v100-16gb.yaml"])
    assert config.variant == "pretrained"
    assert config.training.precision == "fp16" and config.device == "cuda"


@pytest.mark.parametrize("override, expected", [
    ("variantt=main", "unknown key 'variantt'; did you mean 'variant'?"),
    ("data.clip.frame=8", "unknown key 'data.clip.frame'; did you mean 'data.clip.frames'?"),
    ("training.full.vae_lr_multiplyer=0.5", "'training.full.vae_lr_multiplier'"),
    ("vae.maisi.tile.overlapp=0.5", "'vae.maisi.tile.overlap'"),
    ("model.channels=[8]", "unknown key 'model'"),
    ("evaluation.sample_step=4", "unknown key 'evaluation.sample_step'; did you mean 'evaluation.sample_steps'?"),
    ("training.sample_steps=4", "unknown key 'training.sample_steps'"),
])
def test_typos_at_every_depth_name_the_full_path_and_the_nearest_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config([CONFIGS / "main.yaml"], [override])
    assert expected in str(info.value)


def test_misplaced_key_points_to_where_it_belongs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"training": {"encode_mode": "stack"}}))
    with pytest.raises(ConfigError) as info:
        load_config([bad])
    message = str(info.value)
    assert str(bad) in message
    assert "unknown key 'training.encode_mode'" in message
    assert "'vae.maisi.encode_mode'" in message


def test_a_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'data.clip' is a section"):
        load_config([], ["data.clip=16"])


def test_invalid_values_name_their_key():
    with pytest.raises(ConfigError, match="'data.thick.factor'"):
        load_config([], ["data.thick.factor=1"])
    with pytest.raises(ConfigError, match="'vae.maisi.encode_mode'"):
        load_config([], ["vae.maisi.encode_mode=slices"])
    with pytest.raises(ConfigError, match="hu_max"):
        load_config([], ["data.intensity.hu_max=-2000"])
    with pytest.raises(ConfigError, match="'evaluation.sample_steps': Input should be greater than or equal to 1"):
        load_config([], ["evaluation.sample_steps=0"])


def test_set_overrides_parse_yaml_values_and_apply_last():
    config = load_config([CONFIGS / "main.yaml"],
                         ["training.frozen.epochs=2", "denoiser.channels=[8, 16]",
                          "denoiser.attention_levels=[false, true]", "denoiser.norm_num_groups=8",
                          "diffusion.sample_steps=7"])
    assert config.training.frozen.epochs == 2
    assert config.denoiser.channels == [8, 16]
    assert config.diffusion.sample_steps == 7


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config([], ["training.frozen.epochs"])


def test_unreadable_or_non_mapping_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config([tmp_path / "missing.yaml"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config([listing])


def test_resolved_config_round_trips(tmp_path):
    config = load_config([CONFIGS / "pretrained.yaml", CONFIGS / "smoke.yaml"])
    path = write_resolved(config, tmp_path / "out")
    assert load_config([path]) == config
    assert to_yaml(config) == path.read_text()


def test_config_show_prints_the_resolved_config_and_fails_on_a_bad_key(capsys):
    assert cli_main(["config", "show", "--config", str(CONFIGS / "smoke.yaml"), "--set", "seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["seed"] == 7 and shown["data"]["clip"]["height"] == 32
    assert cli_main(["config", "show", "--config", str(CONFIGS / "smoke.yaml"), "--set", "sed=7"]) == 2
    assert "unknown key 'sed'" in capsys.readouterr().err


@pytest.mark.parametrize("override, key, got", [
    ("training.frozen.epochs=yes", "training.frozen.epochs", "True"),
    ("training.checkpoint_every_steps=true", "training.checkpoint_every_steps", "True"),
    ("training.frozen.lr=off", "training.frozen.lr", "False"),
    ("data.clip.frames=16.0", "data.clip.frames", "16.0"),
    ("training.frozen.epochs='2'", "training.frozen.epochs", "'2'"),
    ("data.source=5", "data.source", "5"),
    ("data.augment.flips=1", "data.augment.flips", "1"),
    ("evaluation.sample_steps=true", "evaluation.sample_steps", "True"),
    ("evaluation.sample_steps='4'", "evaluation.sample_steps", "'4'"),
    ("training.val_sample_steps=2.0", "training.val_sample_steps", "2.0"),
    ("diffusion.sample_steps=null", "diffusion.sample_steps", "None"),
])
def test_values_of_the_wrong_type_are_not_coerced(override, key, got):
    with pytest.raises(ConfigError, match=rf"--set {re.escape(override)}: '{key}': .* \(got {re.escape(got)}\)"):
        load_config([CONFIGS / "smoke.yaml"], [override])


def test_yaml_numbers_and_booleans_keep_working(tmp_path):
    """YAML 1.2 floats without a dot (1e-4) are numbers in files and --set alike; yes/no stay booleans."""
    (tmp_path / "c.yaml").write_text("training:\n  frozen: {lr: 1e-4, epochs: 3}\ndata:\n  augment: {flips: no}\n")
    config = load_config([tmp_path / "c.yaml"], ["training.full.lr=2E-5", "data.workspace=/data/ws"])
    assert config.training.frozen.lr == 1e-4 and config.training.frozen.epochs == 3
    assert config.training.full.lr == 2e-5 and config.data.augment.flips is False
    assert config.data.workspace == Path("/data/ws")


@pytest.mark.parametrize("override", ["data.source=", "data.source=  ", "tracking.experiment="])
def test_an_empty_override_value_is_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"empty value for '{re.escape(key)}'"):
        load_config([CONFIGS / "smoke.yaml"], [override])


def test_remote_deadline_settings_are_strict_positive_numbers():
    config = load_config([], ["storage.timeout_s=2", "storage.deadline_s=10.5"])
    assert (config.storage.timeout_s, config.storage.deadline_s) == (2.0, 10.5)
    with pytest.raises(ConfigError, match="'storage.deadline_s'"):
        load_config([], ["storage.deadline_s=0"])
    with pytest.raises(ConfigError, match="'storage.timeout_s'"):
        load_config([], ["storage.timeout_s=fast"])


# ------------------------------------------------------------- issue 20: non-finite numbers, round trips, duplicates
def _float_settings(model: type, prefix: str = "") -> list[str]:
    """The dotted key of every float setting of the schema (a plain float, or float | None)."""
    from typing import get_args

    from ctv2v.config_io import _section_of

    keys = []
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is not None:
            keys += _float_settings(section, f"{prefix}{name}.")
        elif field.annotation is float or float in get_args(field.annotation):
            keys.append(f"{prefix}{name}")
    return keys


FLOAT_SETTINGS = _float_settings(RunConfig)


def test_the_schema_has_float_settings_to_check():
    assert {"training.frozen.lr", "training.grad_clip", "data.intensity.hu_max", "vae.scratch.kl_weight"} <= set(
        FLOAT_SETTINGS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_setting_refuses_non_finite_numbers(value):
    for key in FLOAT_SETTINGS:
        with pytest.raises(ConfigError, match=rf"'{re.escape(key)}': Input should be a finite number"):
            load_config([CONFIGS / "smoke.yaml"], [f"{key}={value}"])


def _readme_config_sets() -> list[tuple[str, ...]]:
    """Every config file alone, and every sequence of `--config configs/X.yaml` a README command line overlays."""
    readme = (CONFIGS.parent / "README.md").read_text()
    overlays = {tuple(re.findall(r"--config configs/(\S+?\.yaml)", line)) for line in readme.splitlines()}
    return sorted({(path.name,) for path in CONFIGS.glob("*.yaml")} | {files for files in overlays if files})


@pytest.mark.parametrize("files", _readme_config_sets(), ids="+".join)
def test_a_written_resolved_config_loads_back_the_same(files, tmp_path):
    config = load_config([CONFIGS / name for name in files])
    assert load_config([write_resolved(config, tmp_path)]) == config


def test_a_string_that_reads_like_a_number_stays_a_string_in_a_resolved_config(tmp_path):
    config = load_config([CONFIGS / "smoke.yaml"], ['data.source="1e5"', 'tracking.experiment="1_000"'])
    again = load_config([write_resolved(config, tmp_path)])
    assert (again.data.source, again.tracking.experiment) == ("1e5", "1_000")


def test_duplicate_keys_are_refused_with_both_line_numbers(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\ndata:\n  clip:\n    frames: 8\n    height: 16\n    frames: 12\nseed: 2\n")
    with pytest.raises(ConfigError) as refused:
        load_config([path])
    assert str(refused.value) == (f"{path}: not valid YAML: duplicate key 'data.clip.frames' at lines 4 and 6; "
                                  "duplicate key 'seed' at lines 1 and 7")
    with pytest.raises(ConfigError, match=r"--set 'data=\{seed: 1, seed: 2\}': value is not valid YAML: duplicate"):
        load_config([], ["data={seed: 1, seed: 2}"])


def test_a_gpu_component_runs_with_the_gpus_compiled_next_to_its_pod_limit():
    text = load_config(CONFIGS / "main.yaml").model_dump_json()
    config = component_config(text, "main", gpus_per_step=4)
    assert config.cluster.gpus_per_step == 4 != component_config(text, "main").cluster.gpus_per_step
    with pytest.raises(ConfigError, match="gpus_per_step"):
        component_config(text, "main", gpus_per_step=9)


# ------------------------------------------------------------------------------------------ sampling steps
def test_validation_and_evaluation_sample_with_the_models_steps_unless_overridden():
    shipped = load_config([CONFIGS / "main.yaml"])
    assert (shipped.diffusion.sample_steps, shipped.validation_sample_steps, shipped.evaluation_sample_steps) == (4, 4, 4)
    assert shipped.training.val_sample_steps is None and shipped.evaluation.sample_steps is None
    changed = load_config([CONFIGS / "main.yaml"], ["diffusion.sample_steps=6"])
    assert (changed.validation_sample_steps, changed.evaluation_sample_steps) == (6, 6)
    overridden = load_config([CONFIGS / "main.yaml"], ["training.val_sample_steps=2", "evaluation.sample_steps=10"])
    assert (overridden.diffusion.sample_steps, overridden.validation_sample_steps,
            overridden.evaluation_sample_steps) == (4, 2, 10)
    one_step = load_config([CONFIGS / "main.yaml", CONFIGS / "cpu-quality.yaml"])
    assert (one_step.diffusion.train_timesteps, one_step.validation_sample_steps,
            one_step.evaluation_sample_steps) == ("sampled", 1, 1)


@pytest.mark.parametrize("override", ["evaluation.sample_steps=4", "training.val_sample_steps=2"])
def test_steps_other_than_those_a_sampled_timesteps_model_learned_are_refused_naming_both_keys(override):
    key, steps = override.split("=")
    with pytest.raises(ConfigError) as info:
        load_config([CONFIGS / "main.yaml", CONFIGS / "cpu-quality.yaml"], [override])
    assert f"{key}={steps} differs from diffusion.sample_steps=1" in str(info.value)
    assert "diffusion.train_timesteps 'sampled'" in str(info.value)
    # The same steps, or none (use diffusion.sample_steps), are what the model learned.
    same = load_config([CONFIGS / "main.yaml", CONFIGS / "cpu-quality.yaml"], [f"{key}=1"])
    assert same.evaluation_sample_steps == same.validation_sample_steps == 1
    # Changing diffusion.sample_steps moves what training draws and every use together.
    moved = load_config([CONFIGS / "main.yaml", CONFIGS / "cpu-quality.yaml"], ["diffusion.sample_steps=4"])
    assert moved.evaluation_sample_steps == moved.validation_sample_steps == 4
