"""What every pipeline step shares, whether `ctv2v <step>` or a KFP component runs it.

- the config a component receives (JSON text) with its branch's variant: the one way a variant is set;
- where a step works on the workspace volume (<workspace_root>/runs/<run id>/<folder>), so retries resume there;
- the prepared data folder named by prepare-data's artifact metadata;
- the process runtime (rank, device, precision) and the seeds of a distributed step;
- the step's MLflow run (on rank 0; the other ranks get a tracker that records nothing);
- running a step on N GPUs: the same function in N processes under torchrun (on several nodes: a TrainJob,
  ctv2v.remote.trainjob);
- copying a step's final files from the workspace into its KFP artifact (every tracked step works on the
  workspace, so the exit handler finds its MLflow journal there: export_files).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ctv2v.config import RunConfig, TrackingConfig
from ctv2v.config_io import config_from_text, to_yaml
from ctv2v.data.prepared import run_workspace
from ctv2v.device import process_group
from ctv2v.files import atomic_write_text, claim_output_folder
from ctv2v.remote.trainjob import launch_folder, run_trainjob, stage_inputs
from ctv2v.train.loop import Runtime, runtime_from_env

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
TORCHRUN_CALL_FILE = "torchrun-call.json"
"""In a temporary folder while a multi-GPU step runs: which step function each torchrun process calls, with what.
Not in the output folder: a step that fails must not leave files there that look like output."""


# ------------------------------------------------------------------------------------------ KFP side
def freeze_for_exit() -> None:
    """In a step's process (a KFP component's body): at exit, every object still alive leaves the garbage
    collector's reach before the interpreter's last collection.

    That collection otherwise walks every object that importing torch, MONAI and MLflow created: 1.5-1.6 CPU
    seconds per step process, 0.2 s frozen (a probe importing what the train and evaluate steps import, exit
    measured with /usr/bin/time). Objects are still released by reference counting, and the atexit handlers
    registered before this one (logging, MLflow's async logging queue) still run after it; only reference cycles
    alive at exit are left to the operating system, as when a process is killed. Registered at exit rather than
    done now, so that a component called in-process (tests) does not freeze its caller's heap.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def component_config(config_json: str, variant: str | None = None, gpus_per_step: int | None = None) -> RunConfig:
    """The run config a KFP component receives, with its branch's variant and, for a GPU step, the GPUs compiled
    next to its pod's GPU limit as cluster.gpus_per_step; INFO logs go to the pod's log."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    overrides = [f"variant={variant}"] if variant else []
    if gpus_per_step is not None:
        overrides.append(f"cluster.gpus_per_step={gpus_per_step}")
    return config_from_text(config_json, "config_json", overrides)


def workspace_dir(workspace_root: str | Path, pipeline_run_id: str, folder: str) -> Path:
    """A step's folder on the workspace volume: it outlives the pod, so a retried step resumes from it."""
    return run_workspace(workspace_root, pipeline_run_id) / folder


def prepared_data_dir(metadata: Mapping[str, Any], uri: str) -> Path:
    """The prepared data folder named by prepare-data's manifest artifact (metadata `data_dir`)."""
    if "data_dir" not in metadata:
        raise ValueError(f"data artifact {uri}: metadata has no 'data_dir' (expected prepare-data's manifest)")
    return Path(metadata["data_dir"])


def export_files(out_dir: Path, artifact_dir: str | Path, names: tuple[str, ...],
                 optional: tuple[str, ...] = ()) -> None:
    """Copy files and folders from a step's folder into its KFP artifact (not the checkpoints, which stay).

    Each of `names` must exist; each of `optional` is copied when the step made it.

    Every step that opens an MLflow run works in its folder on the workspace volume and exports here, including
    the steps whose outputs are only artifacts (match-architecture, evaluate, compare): their MLflow journal (what
    the server did not accept yet, naming its artifact files by path) stays with the files it names, under the
    run's workspace folder, where the exit handler finish-run looks for journals. The other way round cannot work:
    a KFP output artifact is a folder local to the step's pod, uploaded to the object store when the step ends, so
    paths in a journal written there name nothing in finish-run's pod; and KFP's exit task may not take inputs from
    the tasks inside its handler ("exit_task cannot depend on any other tasks", kfp.dsl.tasks_group.ExitHandler).
    The workspace PVC is mounted in every pod of the run, finish-run's too.
    """
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    for name in (*names, *(name for name in optional if (Path(out_dir) / name).exists())):
        source = Path(out_dir) / name
        if source.is_dir():
            shutil.copytree(source, artifact_dir / name, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, artifact_dir / name)


# -------------------------------------------------------------------------------------- multi-GPU
def run_on_gpus(step: Callable[..., Any], gpus: int, config: RunConfig, out_dir: Path, **arguments: Any) -> None:
    """Run `step(config, out_dir=out_dir, **arguments)` here (1 GPU), in `gpus` DDP processes under torchrun, or,
    with cluster.nodes > 1, on that many nodes of `gpus` processes each as a Kubeflow TrainJob.

    Each torchrun process calls the same function with the same arguments (read back from a JSON file), so
    nothing is re-spelled as a command line. Raises if any process fails.
    """
    nodes = config.cluster.nodes
    if gpus <= 1 and nodes == 1:
        step(config, out_dir=out_dir, **arguments)
        return
    out_dir = Path(out_dir)
    if nodes > 1:
        # Every node must read the call file and the inputs: they go on the workspace volume, beside out_dir.
        folder = launch_folder(config, out_dir)
        call_file = _write_call(folder, step, config, out_dir, stage_inputs(arguments, folder, Path(config.cluster.workspace_mount)))
        run_trainjob(config, call_file, out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="ctv2v-torchrun-") as folder:
        call_file = _write_call(Path(folder), step, config, out_dir, arguments)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                        "-m", "ctv2v.steps.context", str(call_file)], check=True,
                       env={**os.environ, **config.cluster.nccl.environment()})


def _write_call(folder: Path, step: Callable[..., Any], config: RunConfig, out_dir: Path,
                arguments: Mapping[str, Any]) -> Path:
    """The torchrun call file in `folder`: the step function, its config and arguments."""
    call = {"step": f"{step.__module__}:{step.__qualname__}", "config": to_yaml(config), "out_dir": str(out_dir),
            "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in arguments.items()}}
    call_file = folder / TORCHRUN_CALL_FILE
    atomic_write_text(call_file, json.dumps(call, indent=2) + "\n")
    return call_file


def _call_from_file(call_file: Path) -> None:
    """One torchrun process: the step call that run_on_gpus wrote."""
    call = json.loads(Path(call_file).read_text())
    module, _, name = call["step"].partition(":")
    step = getattr(importlib.import_module(module), name)
    step(config_from_text(call["config"], str(call_file)), out_dir=Path(call["out_dir"]), **call["arguments"])


# ------------------------------------------------------------------------------------ step runtime
@contextlib.contextmanager
def distributed_runtime(config: RunConfig) -> Iterator[Runtime]:
    """Rank, device and precision from torchrun's environment, inside its process group; seeded for model init."""
    runtime = runtime_from_env(config)
    with process_group(runtime.dist_info, runtime.device, timedelta(seconds=config.cluster.nccl.timeout_s)):
        # Same initial weights on every rank; `seed_per_rank` then gives each rank its own noise stream.
        torch.manual_seed(config.seed)
        yield runtime


def claim_output_folder_once(out_dir: Path, runtime: Runtime) -> None:
    """The main process claims the output folder (ctv2v.files.claim_output_folder) and the others wait for it: a
    check on every process raced with the main process's first writes (its marker's temporary file) and refused
    the folder."""
    if runtime.dist_info.is_main:
        claim_output_folder(out_dir)
    if runtime.dist_info.enabled:
        torch.distributed.barrier()


def seed_per_rank(config: RunConfig, runtime: Runtime) -> None:
    """After the model is built: a different random stream on each rank (noise, crops)."""
    torch.manual_seed(config.seed + runtime.dist_info.rank)


@contextlib.contextmanager
def tracked_step(
    tracking: TrackingConfig,
    out_dir: Path,
    step_name: str,
    pipeline_run_id: str | None,
    *,
    main: bool = True,
    **run_tags: Any,
):
    """The step's nested MLflow run under the pipeline run (a new pipeline run id when none is given)."""
    from ctv2v.tracking.hierarchy import new_pipeline_run_id
    from ctv2v.tracking.runs import Tracker

    tracker = Tracker(tracking, out_dir, enabled=main)  # other ranks of a DDP step record nothing
    with tracker.step_run(step_name, pipeline_run_id or new_pipeline_run_id(), **run_tags):
        yield tracker


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    _call_from_file(Path(sys.argv[1]))
