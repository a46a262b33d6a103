"""Run the same DAG on this machine with kfp.local's SubprocessRunner (CPU, no cluster, no Docker)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kfp import local

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved

log = logging.getLogger(__name__)


class LocalRunError(RuntimeError):
    """The local pipeline run did not produce what it should have."""


def init_local(out_dir: Path) -> Path:
    """Set kfp.local up to run in this interpreter with its outputs, workspace and task cache under `out_dir`;
    returns the folder of the runs' outputs."""
    outputs = out_dir / "kfp-outputs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(outputs),
               workspace_root=str(out_dir / "kfp-workspace"), raise_on_error=True, enable_caching=True,
               cache_root=str(out_dir / "kfp-cache"))
    return outputs


def run_local(config: RunConfig, branches: str, out_dir: Path) -> dict:
    """Run the DAG with the branches of `branches` (main, pretrained or both) under kfp.local into `out_dir`;
    returns paths of its outputs and the wall time.

    Components run in this interpreter's environment (use_venv=False): the project is already installed, and
    the components are built with install_kfp_package=False, so nothing is pip-installed at run time. Everything
    the run writes lands under `out_dir`: KFP's outputs, kfp.local's workspace and task cache, and the steps'
    workspace folder (out_dir/workspace, where the cluster mounts its PVC at cluster.workspace_mount), which is
    kept for inspection. Only downloads go to the shared cache (CTV2V_CACHE, default ~/.cache/ctv2v). As on a
    cluster, a later run into the same `out_dir` reuses the cacheable steps (fetch-checkpoint, match-architecture)
    when their inputs are the same.
    """
    from pipeline.dag import build_pipeline, config_argument

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(config, out_dir)
    outputs = init_local(out_dir)
    kept = config.cluster.model_copy(update={"scratch_cleanup": "never"})
    pipeline_func = build_pipeline(config.model_copy(update={"cluster": kept}), branches, local=True)
    started = time.monotonic()
    pipeline_func(config=config_argument(config), workspace_root=str(out_dir / "workspace"))
    wall_s = time.monotonic() - started
    runs = sorted(outputs.glob("ctv2v-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LocalRunError(f"kfp.local wrote no run folder under {outputs}")
    run_dir = runs[-1]
    result = {"run_dir": str(run_dir), "wall_s": wall_s}
    if branches == "both":
        tables = list(run_dir.glob("compare-op/markdown"))
        if len(tables) != 1:
            raise LocalRunError(f"{run_dir}: expected one compare-op/markdown output, found {len(tables)}")
        result["compare_markdown"] = str(tables[0])
    log.info("local pipeline run finished in %.1f s: %s", wall_s, run_dir)
    return result
