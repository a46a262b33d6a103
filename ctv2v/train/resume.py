"""Training checkpoints: resume exactly after preemption.

A training checkpoint holds everything the loop's future depends on: model, optimizer, GradScaler, LR
scheduler and EMA state, every process's RNG states, and the position in the data (epoch and micro-batch
within it) plus the optimizer step count. Each is written atomically (temporary file, fsync, rename), so a
process killed mid-write leaves the previous checkpoint intact and never a half-written file.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctv2v.models.weights import CheckpointError
from ctv2v.config import RunConfig
from ctv2v.config_io import flatten
from ctv2v.files import atomic_torch_save, check_output_folder, load_torch_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ctv2v-train-checkpoint/2"
"""/2: the progress names the metric that picked best-model (best_val_metric, best_val)."""
FORMAT_BEST_BY_VAL_LOSS = "ctv2v-train-checkpoint/1"
"""The previous format, read too: best-model was picked by val_loss (progress.best_val_loss)."""
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MODULES = {"vae": ("vae",), "frozen": ("denoiser",), "full": ("denoiser", "vae")}
"""The modules whose weights a checkpoint of each phase holds (besides optimizer, scheduler, scaler and EMA)."""
_CHECKPOINT_KEYS = ("format", "phase", "config", "progress", "world_size", "rng", "states")
_RNG_KEYS = ("python", "numpy", "torch")
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
RESUME_MAY_CHANGE = ("cluster", "device", "tracking", "storage", "evaluation", "data.num_workers", "data.workspace")
"""Config sections and keys that may differ between the interrupted run and its resume: where and how the run is
deployed, tracked and later evaluated, none of which changes the model or the data it trains on."""


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
    best_val_metric: str | None = None
    """The metric that picked best-model (ctv2v.train.loop.best_validation), None before a validation."""
    best_val: float | None = None
    """Its value at the best validation so far."""


def checkpoint_path(folder: Path, global_step: int) -> Path:
    return Path(folder) / f"step-{global_step:08d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in `folder` (temporary files of interrupted writes are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    return found[-1][1] if found else None


def check_training_folder(out_dir: Path, resume: bool) -> None:
    """Before any compute, changing nothing: `out_dir` must be new, empty or created by ctv2v
    (ctv2v.files.check_output_folder), and one holding a checkpoint is continued only with --resume."""
    check_output_folder(out_dir)
    latest = latest_checkpoint(Path(out_dir) / CHECKPOINTS_DIR)
    if latest is not None and not resume:
        raise CheckpointError(f"{latest.parent} already holds {latest.name}: pass --resume to continue it, or give "
                              "a new or empty output folder")


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
    atomic_torch_save(payload, target)
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
    payload = load_torch_file(path, "training checkpoint")
    if isinstance(payload, dict) and payload.get("format") == FORMAT_BEST_BY_VAL_LOSS and isinstance(
            payload.get("progress"), dict) and "best_val_loss" in payload["progress"]:
        best_val_loss = payload["progress"].pop("best_val_loss")
        payload["progress"].update(best_val_metric=None if best_val_loss is None else "val_loss",
                                   best_val=best_val_loss)
        payload["format"] = CHECKPOINT_FORMAT
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} file")
    problems = _structure_problems(payload, phase, config)
    if problems:
        raise CheckpointError(f"{path}: an incomplete {CHECKPOINT_FORMAT} file: {'; '.join(problems)}")
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


def _structure_problems(payload: dict[str, Any], phase: str, config: RunConfig) -> list[str]:
    """What a resume of `phase` would miss in a checkpoint payload: missing keys (dotted) and mistyped parts."""
    missing = [key for key in _CHECKPOINT_KEYS if key not in payload]
    expected = {"progress": dict, "rng": list, "states": dict}
    wrong = [f"'{key}' is a {type(payload[key]).__name__}, not a {kind.__name__}"
             for key, kind in expected.items() if key in payload and not isinstance(payload[key], kind)]
    if isinstance(payload.get("progress"), dict):
        missing += [f"progress.{field.name}" for field in fields(Progress) if field.name not in payload["progress"]]
    if isinstance(payload.get("states"), dict) and payload.get("phase") == phase:
        with_ema = config.training.ema_decay is not None and phase != "vae"
        needed = (*CHECKPOINT_MODULES.get(phase, ()), "optimizer", "scheduler", "scaler",
                  *(["ema"] if with_ema else []))
        missing += [f"states.{name}" for name in needed if name not in payload["states"]]
    if isinstance(payload.get("rng"), list):
        if isinstance(payload.get("world_size"), int) and len(payload["rng"]) != payload["world_size"]:
            wrong.append(f"'rng' holds {len(payload['rng'])} process states, 'world_size' is {payload['world_size']}")
        for rank, state in enumerate(payload["rng"]):
            if not isinstance(state, dict):
                wrong.append(f"'rng[{rank}]' is a {type(state).__name__}, not a dict")
            else:
                missing += [f"rng[{rank}].{key}" for key in _RNG_KEYS if key not in state]
    return ([f"missing {', '.join(missing)}"] if missing else []) + wrong


def _may_change(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in RESUME_MAY_CHANGE)


def config_changes(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """Differences that matter for an exact resume (settings of the model or the data), as 'key: old -> new'."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)} -> {current.get(key)}"
        for key in keys
        if saved.get(key) != current.get(key) and not _may_change(key)
    ]
