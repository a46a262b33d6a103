"""The `ctv2v` command line.

It is the outermost layer (configs -> data -> model -> steps -> DAG -> CLI), so it lives beside the DAG:
`ctv2v` itself stays importable without kfp. Each step module in components/ registers its own subcommand
with the same arguments the KFP component passes, so `docker run IMAGE ctv2v <step> ...` is the pipeline's
own command line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ctv2v.config import ConfigError
from ctv2v.config_io import add_config_arguments, config_from_args, to_yaml

COMMAND_MODULES = [
    "ctv2v.commands",
    "ctv2v.model_commands",
    "components.fetch_checkpoint",
    "components.match_architecture",
    "components.train_vae",
    "components.train",
    "components.evaluate",
    "components.compare",
    "components.prepare_data",
    "pipeline.commands",
]
"""Modules with a `register(subparsers)` function; each adds its subcommands with `set_defaults(func=...)`."""


def _config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(config_from_args(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctv2v", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="config_command", required=True)
    show = config.add_parser("show", help="print the resolved config (fails on an unknown key)")
    add_config_arguments(show)
    show.set_defaults(func=_config_show)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"ctv2v: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input (files, tensors, servers) gets one line; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"ctv2v: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
