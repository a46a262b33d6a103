"""Subcommands of the ML core that are not pipeline steps: `data fetch-demo` and `data baselines`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` subcommands."""
    data = sub.add_parser("data", help="demo data and preprocessing").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch-demo", help="download + verify the demo CT volumes; print the dataset folder")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help="where the demo folder goes (default $CTV2V_CACHE/demo or ~/.cache/ctv2v/demo)")
    fetch.set_defaults(func=_fetch_demo)
    _register_baselines(data)


def _fetch_demo(args: argparse.Namespace) -> int:
    from ctv2v.data.demo import fetch_demo

    print(fetch_demo(args.cache_dir))
    return 0


def _register_baselines(data: argparse._SubParsersAction) -> None:
    from ctv2v.config_io import add_config_arguments

    baselines = data.add_parser(
        "baselines", help="score nearest/linear/cubic interpolation on the dataset; print the table, write JSON")
    add_config_arguments(baselines)
    baselines.add_argument("--factors", type=int, nargs="+", default=[2, 4], metavar="K",
                           help="thick factors to simulate (default: 2 4); the thick method is data.thick.method")
    baselines.add_argument("--volumes", nargs="+", default=None, metavar="ID",
                           help="only these volume ids of the dataset (default: all)")
    baselines.add_argument("--out", type=Path, default=None,
                           help="output folder (default: <data.workspace>/baselines)")
    baselines.set_defaults(func=_baselines)


BASELINES_DATA_DIR = "baselines-data"
"""Under data.workspace: the staged dataset and preprocessing cache of `data baselines`. Not the pipeline's
`data` folder, because staging replaces `<data_dir>/dataset`, which a running pipeline may be reading."""


def _baselines(args: argparse.Namespace) -> int:
    from ctv2v.config_io import write_resolved
    from ctv2v.data.cache import PreprocessCache
    from ctv2v.data.prepared import PREPROCESS_CACHE_DIR, stage_dataset
    from ctv2v.evaluate.baseline_report import baseline_report, format_table, write_report
    from ctv2v.config_io import config_from_args

    config = config_from_args(args)
    out = args.out if args.out is not None else config.data.workspace / "baselines"
    data_dir = config.data.workspace / BASELINES_DATA_DIR
    report = baseline_report(
        stage_dataset(config.data.source, data_dir, config), config.data, factors=args.factors,
        hu_min=config.evaluation.hu_min, hu_max=config.evaluation.hu_max, methods=config.evaluation.baselines,
        volume_ids=args.volumes, cache=PreprocessCache(data_dir / PREPROCESS_CACHE_DIR),
    )
    write_report(report, out)
    write_resolved(config, out)
    print(format_table(report))
    print(f"reports: {out}")
    return 0
