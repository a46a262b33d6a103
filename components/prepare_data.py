"""Pipeline step `prepare-data`: stage the dataset, write the split manifest, fill the preprocessing cache.

Both branches read the folder this step writes, so they are structurally bound to the same data and split.
The folder (cache included) lives on the workspace volume; the Dataset artifact carries the manifest alone.
"""

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from kfp.dsl import Dataset, Output

from components.base import step_component
from ctv2v.config import RunConfig
from ctv2v.data.prepared import prepare_data

log = logging.getLogger(__name__)


def prepare_data_step(config: RunConfig, data_dir: Path) -> dict[str, Any]:
    """Prepare `data_dir` from data.source; returns the manifest's split summary."""
    manifest = prepare_data(config, Path(data_dir))
    summary = {"data_dir": str(data_dir), "source": config.data.source, "splits": manifest["splits"],
               "thick_method": config.data.thick.method, "thick_factor": config.data.thick.factor}
    log.info("prepared %s: %s", data_dir, summary["splits"])
    return summary


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `prepare-data` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("prepare-data", help="stage data.source, write manifest.json, fill the cache")
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="prepared data folder (manifest, dataset, cache)")
    parser.set_defaults(func=_prepare_data_command)


def _prepare_data_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    print(json.dumps(prepare_data_step(config_from_args(args), args.out), indent=2))
    return 0


@step_component
def prepare_data_op(config_yaml: str, workspace_root: str, pipeline_run_id: str, manifest: Output[Dataset]):
    """Prepare <workspace_root>/runs/<run id>/data; `manifest` gets manifest.json, its metadata the folder."""
    import shutil

    from components.prepare_data import prepare_data_step
    from ctv2v.config_io import config_from_text
    from ctv2v.data.prepared import MANIFEST_FILE, run_workspace

    data_dir = run_workspace(workspace_root, pipeline_run_id) / "data"
    summary = prepare_data_step(config_from_text(config_yaml, "config_yaml"), data_dir)
    shutil.copyfile(data_dir / MANIFEST_FILE, manifest.path)
    manifest.metadata.update({"data_dir": str(data_dir), **summary["splits"]})
