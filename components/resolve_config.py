"""KFP component of the `resolve-config` step: the run's config from the `config` parameter and the typed run
parameters (ctv2v.steps.pipeline_inputs), and the cache-key inputs of fetch-checkpoint and match-architecture."""

from typing import NamedTuple

from components.base import step_component


@step_component
def resolve_config_op(
    config_json: str,
    compiled_parameters: str,
    data_source: str,
    thick_factor: int,
    frozen_epochs: int,
    frozen_lr: float,
    full_epochs: int,
    full_lr: float,
    sample_steps: int,
    vae_epochs: int,
    vae_lr: float,
) -> NamedTuple("Outputs", [("config", str), ("fetch_config", str), ("match_config", str)]):
    """Apply the run parameters to `config_json` (strict schema); `compiled_parameters` holds their compiled
    defaults (JSON); a package without the `main` branch passes the scratch VAE's as constants. Outputs the run's
    config and the keys of the two cacheable steps."""
    import json
    import logging
    from collections import namedtuple

    from ctv2v.steps.context import component_config, freeze_for_exit
    from ctv2v.steps.pipeline_inputs import FETCH_KEYS, MATCH_KEYS, cache_key_config, resolve_run_config

    component_config(config_json)  # the config text alone must be valid: its errors then name no parameter
    given = {"data_source": data_source, "thick_factor": thick_factor, "frozen_epochs": frozen_epochs,
             "frozen_lr": frozen_lr, "full_epochs": full_epochs, "full_lr": full_lr, "sample_steps": sample_steps,
             "vae_epochs": vae_epochs, "vae_lr": vae_lr}
    config = resolve_run_config(config_json, json.loads(compiled_parameters), given)
    logging.getLogger("resolve-config").info("run parameters: %s", json.dumps(given, sort_keys=True))
    outputs = namedtuple("Outputs", ["config", "fetch_config", "match_config"])
    freeze_for_exit()
    return outputs(config.model_dump_json(), cache_key_config(config, FETCH_KEYS), cache_key_config(config, MATCH_KEYS))
