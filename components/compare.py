"""Pipeline step `compare`: `main` vs `pretrained` (and each vs the baselines) from their evaluation reports.

Writes comparison.md and comparison.html (ctv2v.evaluate.compare) into OUT; refuses reports made from different
manifests, HU windows, thick-slice methods or test volumes. MLflow: a nested `compare` run under the pipeline
run's parent, with the tables as artifacts and the headline numbers (mean PSNR on synthesized slices of each
model, and pretrained minus main) as metrics, so the parent run lists the answer beside the step runs.
"""

import argparse
from pathlib import Path

from kfp.dsl import HTML, Artifact, Input, Markdown, Output

from components.base import step_component
from ctv2v.config import TrackingConfig


def comparison_metrics(reports: dict[str, dict]) -> dict[str, float]:
    """Headline numbers for MLflow: each model's and baseline's mean synthesized-slice PSNR, and their differences."""
    from ctv2v.evaluate.compare import HEADLINE
    from ctv2v.evaluate.evaluate import MODEL

    metric, subset = HEADLINE
    values = {f"compare/{variant}/{subset}/{metric}": report["aggregate"][MODEL][subset][metric]
              for variant, report in reports.items()}
    first = next(iter(reports.values()))
    for method in first["baselines"]:
        values[f"compare/{method}/{subset}/{metric}"] = first["aggregate"][method][subset][metric]
    if "main" in reports and "pretrained" in reports:
        values[f"compare/pretrained_minus_main/{subset}/{metric}"] = (
            values[f"compare/pretrained/{subset}/{metric}"] - values[f"compare/main/{subset}/{metric}"])
    return values


def compare_step(
    report_paths: dict[str, Path],
    out_dir: Path,
    tracking: TrackingConfig,
    pipeline_run_id: str | None = None,
) -> tuple[str, str]:
    """Compare the evaluation reports (variant -> report.json or evaluation folder); returns (markdown, html)."""
    from ctv2v.evaluate.compare import HTML_FILE, MARKDOWN_FILE, compare, load_report
    from ctv2v.tracking.runs import Tracker, new_pipeline_run_id

    reports = {variant: load_report(path) for variant, path in report_paths.items()}
    out_dir = Path(out_dir)
    markdown, page = compare(reports, out_dir)
    tracker = Tracker(tracking, out_dir)
    with tracker.step_run("compare", pipeline_run_id or new_pipeline_run_id(), phase="compare"):
        tracker.log_metrics(comparison_metrics(reports), step=0)
        tracker.log_artifact(out_dir / MARKDOWN_FILE, "comparison")
        tracker.log_artifact(out_dir / HTML_FILE, "comparison")
    return markdown, page


# ---------------------------------------------------------------------------------------------- CLI
def parse_report_arguments(named: list[str], folders: list[Path]) -> dict[str, Path]:
    """`--report VARIANT=PATH` values and positional evaluation folders (variant read from each report)."""
    from ctv2v.evaluate.compare import ComparisonError, load_report

    paths: dict[str, Path] = {}

    def add(variant: str, path: Path) -> None:
        if variant in paths:
            raise ComparisonError(f"two reports for variant '{variant}': {paths[variant]} and {path}")
        paths[variant] = path

    for text in named:
        variant, sep, path = text.partition("=")
        if not sep or not variant or not path:
            raise ComparisonError(f"--report {text!r}: expected VARIANT=PATH, e.g. main=runs/main/evaluate")
        add(variant, Path(path))
    for folder in folders:
        add(load_report(folder)["variant"], Path(folder))
    return paths


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    from ctv2v.config_io import add_config_arguments

    parser = sub.add_parser("compare", help="compare evaluation reports (main vs pretrained) as Markdown/HTML")
    parser.add_argument("folders", nargs="*", type=Path, metavar="EVAL_DIR",
                        help="evaluation output folders (the variant is read from each report.json)")
    parser.add_argument("--report", action="append", default=[], metavar="VARIANT=PATH",
                        help="an evaluation report.json or folder for VARIANT, e.g. pretrained=runs/p/evaluate")
    parser.add_argument("--out", required=True, type=Path, help="output folder (comparison.md, comparison.html)")
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")
    add_config_arguments(parser, required=False)
    parser.set_defaults(func=_compare_command)


def _compare_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    tracking = config_from_args(args).tracking
    markdown, _ = compare_step(parse_report_arguments(args.report, args.folders), args.out, tracking,
                               args.pipeline_run_id)
    print(markdown)
    return 0


# ---------------------------------------------------------------------------------------------- KFP
@step_component
def compare_op(
    config_yaml: str,
    pipeline_run_id: str,
    main_report: Input[Artifact],
    pretrained_report: Input[Artifact],
    comparison: Output[Artifact],
    markdown: Output[Markdown],
    html: Output[HTML],
):
    """Compare the two variants' evaluation folders; the tables go to the Markdown and HTML outputs."""
    from pathlib import Path

    from components.compare import compare_step
    from ctv2v.config_io import config_from_text

    config = config_from_text(config_yaml, "config_yaml")
    text, page = compare_step({"main": Path(main_report.path), "pretrained": Path(pretrained_report.path)},
                              Path(comparison.path), config.tracking, pipeline_run_id)
    Path(markdown.path).write_text(text)
    Path(html.path).write_text(page)
