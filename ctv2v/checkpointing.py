"""Training checkpoints (resume exactly after preemption) and the trained-model artifact the evaluate step reads.

A training checkpoint holds everything the loop's future depends on: model, optimizer, GradScaler, LR
scheduler and EMA state, every process's RNG states, and the position in the data (epoch and micro-batch
within it) plus the optimizer step count. Each is written atomically (temporary file, fsync, rename), so a
process killed mid-write leaves the previous checkpoint intact and never a half-written file.

The trained-model artifact is a folder:
    vae/                  the VAE in ctv2v.vae's save_vae_artifact format (fine-tuned weights after `full`)
    denoiser.pt           the denoiser's state dict (the EMA weights when EMA was on), loaded strictly
    model.json            format, phase, variant, VAE weights label, which denoiser weights, the config
    resolved-config.yaml
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctv2v.config import RunConfig, flatten, write_resolved
from ctv2v.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ctv2v-train-checkpoint/1"
MODEL_FORMAT = "ctv2v-trained-model/1"
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
RESUME_MAY_CHANGE = ("tracking.", "data.num_workers", "data.workspace", "storage.", "evaluation.")
"""Config keys that may differ between the interrupted run and its resume: they do not touch training."""


class CheckpointError(ValueError):
    """A checkpoint or trained-model folder is missing, malformed or does not fit the config; names the file."""


FINE_TUNED = "fine-tuned (full phase)"


def weights_kind(label: str | None) -> str:
    """The VAE artifact's weights kind in a label ('scratch, fine-tuned (full phase)' -> 'scratch')."""
    if not label:
        raise CheckpointError("the VAE carries no weights label (pretrained, scratch or stand-in)")
    return label.split(",", 1)[0].strip()


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA, if present) RNG states, in torch-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise CheckpointError("the checkpoint holds CUDA RNG states but this process has no CUDA device")
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- training checkpoints
@dataclass
class Progress:
    """Where training stands: `batch_in_epoch` micro-batches of `epoch` are done, `global_step` optimizer steps."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_val_loss: float | None = None


def checkpoint_path(folder: Path, global_step: int) -> Path:
    return Path(folder) / f"step-{global_step:08d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in `folder` (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    return found[-1][1] if found else None


def save_checkpoint(
    folder: Path,
    *,
    phase: str,
    config: RunConfig,
    progress: Progress,
    states: dict[str, dict],
    rng_per_rank: list[dict[str, Any]],
) -> Path:
    """Write `step-<global_step>.pt` atomically into `folder`, then remove older step checkpoints."""
    target = checkpoint_path(folder, progress.global_step)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "phase": phase,
        "config": flatten(config),
        "progress": asdict(progress),
        "world_size": len(rng_per_rank),
        "rng": rng_per_rank,
        "states": states,
    }
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    for old in Path(folder).iterdir():
        # Older checkpoints, and temporaries of a write that a kill interrupted (only rank 0 writes here).
        stale_temporary = old.name.startswith(".step-") and old.name.endswith(".tmp")
        if (_STEP_FILE.match(old.name) and old != target) or stale_temporary:
            old.unlink()
    log.info("checkpoint %s (epoch %d, batch %d)", target, progress.epoch, progress.batch_in_epoch)
    return target


def load_checkpoint(path: Path, *, phase: str, config: RunConfig, world_size: int) -> dict[str, Any]:
    """Read a training checkpoint and check it belongs to this phase, config and number of processes."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: cannot read training checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file")
    if payload["phase"] != phase:
        raise CheckpointError(f"{path}: checkpoint of phase {payload['phase']!r}, resuming phase {phase!r}")
    if payload["world_size"] != world_size:
        raise CheckpointError(
            f"{path}: written by {payload['world_size']} processes; resume with the same number "
            f"(now {world_size}) so that data shards and RNG streams continue exactly"
        )
    changed = config_changes(payload["config"], flatten(config))
    if changed:
        raise CheckpointError(f"{path}: the config changed since this checkpoint: {'; '.join(changed)}")
    payload["progress"] = Progress(**payload["progress"])
    return payload


def config_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """Differences that matter for an exact resume, as 'key: old -> new'."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)} -> {current.get(key)}"
        for key in keys
        if saved.get(key) != current.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    ]


# ------------------------------------------------------------------------------------ trained model
def save_trained_model(
    model: torch.nn.Module,
    out_dir: Path,
    config: RunConfig,
    ema: torch.nn.Module | None,
    *,
    phase: str,
) -> Path:
    """Write the trained-model folder; the denoiser weights are `ema`'s when given (the ones to sample with)."""
    from ctv2v.vae import save_vae_artifact

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = model.vae
    fine_tuned = phase == "full"
    kind = weights_kind(vae.weights_label)
    vae_label = f"{kind}, {FINE_TUNED}" if fine_tuned else vae.weights_label
    save_vae_artifact(vae, out_dir / "vae", weights=kind, extra={"phase": phase, "fine_tuned": fine_tuned})
    denoiser_state = (ema.module if ema is not None else model.denoiser).state_dict()
    with atomic_path(out_dir / "denoiser.pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in denoiser_state.items()}, tmp)
    meta = {
        "format": MODEL_FORMAT,
        "phase": phase,
        "variant": config.variant,
        "vae_weights": vae_label,
        "denoiser_weights": f"ema (decay {config.training.ema_decay})" if ema is not None else "raw",
        "config": json.loads(config.model_dump_json()),
    }
    write_resolved(config, out_dir)
    atomic_write_text(out_dir / "model.json", json.dumps(meta, indent=2) + "\n")
    log.info("trained model (%s phase, VAE: %s) -> %s", phase, vae_label, out_dir)
    return out_dir


def read_model_meta(model_dir: Path) -> dict[str, Any]:
    """model.json of a trained-model folder, checked for format."""
    meta_path = Path(model_dir) / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{model_dir}: not a trained-model folder (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    return meta


def load_trained_model(model_dir: Path, config: RunConfig):
    """The VideoToVideoDiffusion of a trained-model folder, built from `config` and loaded strictly."""
    from ctv2v.model import build_model
    from ctv2v.vae import load_vae_artifact

    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    saved = RunConfig.model_validate(meta["config"])
    for section in ("variant", "denoiser", "diffusion"):
        if getattr(saved, section) != getattr(config, section):
            raise CheckpointError(
                f"{model_dir}/model.json: trained with {section}={getattr(saved, section)!r}, "
                f"but the config has {getattr(config, section)!r}"
            )
    vae = load_vae_artifact(model_dir / "vae", config.vae.maisi)
    vae.weights_label = meta["vae_weights"]
    model = build_model(config, vae)
    weights_path = model_dir / "denoiser.pt"
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing denoiser weights")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    load_state_strictly(model.denoiser, state, weights_path)
    return model


def load_state_strictly(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict) with an error that names the file and the mismatched keys or shapes."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        raise CheckpointError(
            f"{source}: weights do not match the config's architecture: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(reshaped)} with another shape (e.g. {reshaped[:3]})"
        )
    module.load_state_dict(state, strict=True)

