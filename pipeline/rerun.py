"""`ctv2v pipeline rerun`: the `docker run` command that reruns one task of a finished pipeline run.

A run's workspace folder (<workspace_root>/runs/<pipeline run id>, kept with cluster.scratch_cleanup=never or a
failed run, or `pipeline run-local`'s <out>/workspace/runs/<id>) holds each step's folder with the resolved config
it ran with. The command mounts that folder at the same path inside the container (so every path in the step's
arguments means the same file on both sides), runs as the folder's owner, uses the step's image by digest when the
run's config pinned one, and passes the pipeline run id, so the step logs into that run's MLflow parent (and, for a
step whose folder holds its MLflow run file, into the same step run) and ends its own run. A loopback tracking URI
is rewritten to host.docker.internal, which `--add-host=host.docker.internal:host-gateway` points at the host.

Every step's folder is in the run's workspace folder (match-architecture, evaluate and compare work there too, so
the exit handler finds their MLflow journals) except fetch-checkpoint's, whose KFP output is only an artifact: its
rerun gets a folder there. A task whose input folder is missing says which task to rerun first.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ctv2v.config import RunConfig
from ctv2v.config_io import load_config
from ctv2v.data.prepared import DATASET_DIR
from ctv2v.tracking.runs import RUN_FILE_PREFIX
from ctv2v.tracking.server import tracking_uri

RESOLVED_CONFIG = "resolved-config.yaml"
DATA_FOLDER = "data"
DOCKER_HOST_ALIAS = "host.docker.internal"
"""The host as seen from a container: Docker Desktop defines it; on Linux `--add-host=...:host-gateway` does."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
TRAINING_SHM = "16g"
"""Training steps' DataLoader workers pass batches through /dev/shm (Docker's default is 64 MB)."""
VARIANTS = ("main", "pretrained")
VAE_FOLDERS = {"main": "train-vae-main", "pretrained": "vae-pretrained"}
"""Where each variant's VAE artifact is: train-vae's folder, or the folder a `match` rerun writes."""


class RerunError(ValueError):
    """The run folder or the task cannot give a rerun command."""


@dataclass(frozen=True)
class Task:
    """One task of the DAG as a `ctv2v` step command on the run's workspace folder."""

    step: str
    image: str
    """`cpu` or `trainer` (ClusterConfig.step_image)."""
    folder: str
    """Its output folder under the run's workspace folder (--out)."""
    variant: str | None = None
    inputs: tuple[tuple[str, str], ...] = ()
    """(option, folder under the run's workspace folder), e.g. ("--data", "data"); `--report` values are
    VARIANT=folder."""
    options: tuple[str, ...] = ()
    mlflow_step: str | None = None
    """The step name of its MLflow run (None: the step opens no run and takes no --pipeline-run-id)."""
    training: bool = False


def tasks() -> dict[str, Task]:
    """Every rerunnable task, by name (the step folder names of the run's workspace folder)."""
    found = {
        "prepare-data": Task("prepare-data", "cpu", DATA_FOLDER),
        "fetch-checkpoint": Task("fetch-checkpoint", "cpu", "checkpoint", "pretrained"),
        "match": Task("match", "trainer", VAE_FOLDERS["pretrained"], "pretrained",
                      (("--checkpoint", "checkpoint"), ("--data", DATA_FOLDER)), mlflow_step="match-architecture"),
        "train-vae-main": Task("train-vae", "trainer", VAE_FOLDERS["main"], "main", (("--data", DATA_FOLDER),),
                               ("--resume",), mlflow_step="train-vae", training=True),
        "compare": Task("compare", "cpu", "compare", None,
                        tuple(("--report", f"{variant}=evaluate-{variant}") for variant in VARIANTS),
                        mlflow_step="compare"),
    }
    for variant in VARIANTS:
        vae = ("--vae", VAE_FOLDERS[variant])
        found[f"train-frozen-{variant}"] = Task("train", "trainer", f"train-frozen-{variant}", variant,
                                                (("--data", DATA_FOLDER), vae), ("--phase", "frozen", "--resume"),
                                                mlflow_step="train-frozen", training=True)
        found[f"train-full-{variant}"] = Task("train", "trainer", f"train-full-{variant}", variant,
                                              (("--data", DATA_FOLDER), vae, ("--init", f"train-frozen-{variant}")),
                                              ("--phase", "full", "--resume"), mlflow_step="train-full",
                                              training=True)
        found[f"evaluate-{variant}"] = Task("evaluate", "trainer", f"evaluate-{variant}", variant,
                                            (("--data", DATA_FOLDER), ("--model", f"train-full-{variant}/model")),
                                            mlflow_step="evaluate")
    return found


def _producer(folder: str) -> str:
    """The task that writes `folder` (first path part)."""
    top = folder.split("/")[0]
    return next(name for name, task in tasks().items() if task.folder == top)


def _reachable_uri(uri: str) -> tuple[str, bool]:
    """`uri` as a container reaches it, and whether that needs the host alias (a loopback host becomes it)."""
    parts = urlsplit(uri)
    if parts.hostname not in LOOPBACK_HOSTS:
        return uri, False
    netloc = DOCKER_HOST_ALIAS + (f":{parts.port}" if parts.port else "")
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    return urlunsplit(parts._replace(netloc=netloc)), True


@dataclass(frozen=True)
class RerunCommand:
    """The docker argv and what the user should know about it (one line each)."""

    argv: list[str]
    notes: list[str]

    def line(self) -> str:
        """The command as one shell line."""
        return shlex.join(self.argv)


def rerun_command(run_dir: Path, task_name: str, *, tracking_uri_override: str | None = None,
                  gpus: str | None = None) -> RerunCommand:
    """The `docker run` command that reruns `task_name` of the finished run whose workspace folder is `run_dir`."""
    all_tasks = tasks()
    if task_name not in all_tasks:
        raise RerunError(f"--task {task_name!r}: expected one of {', '.join(all_tasks)}")
    task = all_tasks[task_name]
    run_dir = Path(run_dir).resolve()
    own_config = run_dir / task.folder / RESOLVED_CONFIG
    config_file = own_config if own_config.is_file() else run_dir / DATA_FOLDER / RESOLVED_CONFIG
    if not config_file.is_file():
        raise RerunError(f"{run_dir}: not a pipeline run's workspace folder (no {DATA_FOLDER}/{RESOLVED_CONFIG}; "
                         "expected <workspace_root>/runs/<pipeline run id>)")
    config: RunConfig = load_config([config_file], [])
    notes: list[str] = []

    arguments = [task.step, "--config", str(config_file)]
    if task.variant is not None:
        arguments += ["--set", f"variant={task.variant}"]
    uri = tracking_uri_override or tracking_uri(config.tracking)
    needs_host_alias = False
    if uri is None:
        notes.append("no tracking URI (tracking.tracking_uri, MLFLOW_TRACKING_URI or --tracking-uri): the rerun "
                     "logs nothing to MLflow")
    else:
        uri, needs_host_alias = _reachable_uri(uri)
        # --set wins over both the config's URI and MLFLOW_TRACKING_URI, the order the steps read them in.
        arguments += ["--set", f"tracking.tracking_uri={uri}"]
    for option, folder in task.inputs:
        path_text = folder.partition("=")[2] if option == "--report" else folder
        if not (run_dir / path_text).exists():
            raise RerunError(f"{run_dir / path_text}: missing; rerun task {_producer(path_text)!r} first (it did not "
                             "write into this run's workspace folder)")
        value = (f"{folder.partition('=')[0]}={run_dir / path_text}" if option == "--report"
                 else str(run_dir / path_text))
        arguments += [option, value]
    arguments += [*task.options, "--out", str(run_dir / task.folder)]
    if task.mlflow_step is not None:
        arguments += ["--pipeline-run-id", run_dir.name]
        run_file = run_dir / task.folder / f"{RUN_FILE_PREFIX}{task.mlflow_step}.json"
        if run_file.is_file():
            notes.append(f"logs into the MLflow run recorded in {run_file} (pipeline run {run_dir.name})")
        else:
            notes.append(f"a new MLflow step run under pipeline run {run_dir.name}'s parent run")

    mounts = [f"{run_dir}:{run_dir}"]
    dataset = run_dir / DATA_FOLDER / DATASET_DIR
    if dataset.is_symlink():
        target = dataset.resolve()
        mounts.append(f"{target}:{target}:ro")
    if task_name == "prepare-data" and not config.data.source.startswith("s3://") and Path(config.data.source).is_dir():
        source = Path(config.data.source).resolve()
        mounts.append(f"{source}:{source}:ro")

    image = config.cluster.step_image(task.image)
    if "@sha256:" not in image:
        notes.append(f"image {image} is a tag, not a digest: the run's config pinned none "
                     "(compile with --images-lock to pin the steps' images)")
    owner = run_dir.stat()
    docker = ["docker", "run", "--rm", "--user", f"{owner.st_uid}:{owner.st_gid}"]
    if gpus is not None:
        if task.image != "trainer":
            raise RerunError(f"--gpus: task {task_name!r} runs on the cpu image and uses no GPU")
        docker += ["--gpus", gpus]
    elif task.image == "trainer":
        # docker fails (it does not fall back to the CPU) on a host without the NVIDIA runtime: opt in.
        notes.append("runs on the CPU; on a host with the NVIDIA container runtime ask for --gpus all")
    if task.training:
        docker += ["--shm-size", TRAINING_SHM]
    if needs_host_alias:
        docker += [f"--add-host={DOCKER_HOST_ALIAS}:host-gateway"]
    for mount in mounts:
        docker += ["-v", mount]
    return RerunCommand([*docker, image, *arguments], notes)

