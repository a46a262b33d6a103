"""`ctv2v pipeline compile | submit | run-local`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BRANCHES = ("both", "main", "pretrained")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `pipeline` subcommands."""
    from ctv2v.config_io import add_config_arguments

    group = sub.add_parser("pipeline", help="compile, submit or run the KFP DAG").add_subparsers(
        dest="pipeline_command", required=True)

    compile_ = group.add_parser("compile", help="compile the DAG to KFP YAML, validated against KFP's protobufs")
    add_config_arguments(compile_, required=False)
    compile_.add_argument("-o", "--output", required=True, type=Path)
    compile_.set_defaults(func=_compile)

    submit = group.add_parser("submit", help="compile and submit one run through kfp.Client")
    add_config_arguments(submit)
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example/pipeline")
    submit.add_argument("--namespace", default=None, help="profile namespace (multi-user Kubeflow)")
    submit.add_argument("--experiment", default="ctv2v", help="KFP experiment name (default: ctv2v)")
    submit.add_argument("--branches", choices=BRANCHES, default="both")
    submit.add_argument("--run-name", default=None)
    auth = submit.add_mutually_exclusive_group()
    auth.add_argument("--token", default=None, help="bearer token for the KFP API")
    auth.add_argument("--cookie", default=None, help="session cookie, e.g. 'authservice_session=...'")
    submit.add_argument("--wait", action="store_true", help="follow the run; exit non-zero unless it succeeds")
    submit.set_defaults(func=_submit)

    run_local = group.add_parser("run-local", help="run the DAG on this machine under kfp.local (CPU)")
    add_config_arguments(run_local)
    run_local.add_argument("--branches", choices=BRANCHES, default="both")
    run_local.add_argument("--weights", choices=("pretrained", "stand-in"), default=None,
                           help="MAISI weights for the pretrained branch; `stand-in` builds random weights in "
                                "MAISI's layout (offline demos), labelled so everywhere")
    run_local.add_argument("--out", type=Path, default=None, help="default: <data.workspace>/pipeline")
    run_local.set_defaults(func=_run_local)


def _config(args: argparse.Namespace):
    from ctv2v.config_io import config_from_args

    if getattr(args, "weights", None):
        args.overrides = [*args.overrides, f"vae.maisi.weights={args.weights}"]
    return config_from_args(args)


def _compile(args: argparse.Namespace) -> int:
    from pipeline.spec import compile_pipeline

    print(compile_pipeline(_config(args), args.output))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipeline.submit import RunFailed, submit

    try:
        run_id = submit(_config(args), host=args.host, namespace=args.namespace, experiment=args.experiment,
                        branches=args.branches, token=args.token, cookie=args.cookie, run_name=args.run_name,
                        wait=args.wait)
    except RunFailed as exc:
        print(f"ctv2v: {exc}", file=sys.stderr)
        return 1
    print(run_id)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pipeline.local import run_local

    config = _config(args)
    result = run_local(config, args.branches, args.out or config.data.workspace / "pipeline")
    if "compare_markdown" in result:
        print(Path(result["compare_markdown"]).read_text())
    print(json.dumps(result, indent=2))
    return 0
