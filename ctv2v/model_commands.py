"""`ctv2v model ...` subcommands: `model summary` prints parameter counts, latent shapes and FLOPs per step."""

from __future__ import annotations

import argparse
import json
import sys

from ctv2v.models.summary import format_summary, summarize


def _model_summary(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    summary = summarize(config_from_args(args))
    sys.stdout.write((json.dumps(summary, indent=2) if args.json else format_summary(summary)) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `model` command group with `summary`."""
    from ctv2v.config_io import add_config_arguments

    model = sub.add_parser("model", help="inspect the configured model").add_subparsers(
        dest="model_command", required=True)
    summary = model.add_parser("summary", help="parameter counts, latent shapes and FLOPs per training step")
    add_config_arguments(summary)
    summary.add_argument("--json", action="store_true", help="print the summary as JSON")
    summary.set_defaults(func=_model_summary)
