"""Subcommands of the ML core that are not pipeline steps: `data ...` and `model ...`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data` and `model` subcommands."""
    sub.add_parser("data", help="demo data and preprocessing").add_subparsers(dest="data_command", required=True)
