"""Step `compare`: `main` vs `pretrained` (and each vs the baselines) from their evaluation reports.

Writes comparison.md and comparison.html (ctv2v.evaluate.compare) into OUT; refuses reports made from different
manifests, HU windows, thick-slice methods or test volumes. MLflow: a nested `compare` run under the pipeline
run's parent, with the tables as artifacts and the headline numbers (mean PSNR on synthesized slices of each
model, and pretrained minus main) as metrics, so the parent run lists the answer beside the step runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctv2v.config import TrackingConfig
from ctv2v.evaluate.compare import HTML_FILE, MARKDOWN_FILE, compare, load_report
from ctv2v.evaluate.evaluate import MODEL, EvaluationReport
from ctv2v.evaluate.metrics import HEADLINE
from ctv2v.steps.context import tracked_step

OUTPUT_FILES = (MARKDOWN_FILE, HTML_FILE)
"""What the step writes into OUT and its KFP component exports into the `comparison` artifact."""


@dataclass(frozen=True)
class Comparison:
    """The comparison tables (Markdown, HTML) and the headline numbers logged to MLflow."""

    markdown: str
    html: str
    out_dir: Path
    """Holds MARKDOWN_FILE and HTML_FILE."""
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: where the tables are and the headline numbers."""
        return {"markdown_file": str(self.out_dir / MARKDOWN_FILE), "html_file": str(self.out_dir / HTML_FILE),
                "metrics": self.metrics}


def comparison_metrics(reports: dict[str, EvaluationReport]) -> dict[str, float]:
    """Headline numbers for MLflow: each model's and baseline's mean synthesized-slice PSNR, and their differences."""
    metric, subset = HEADLINE
    values = {f"compare/{variant}/{subset}/{metric}": report.aggregate[MODEL][subset][metric]
              for variant, report in reports.items()}
    first = next(iter(reports.values()))
    for method in first.baselines:
        values[f"compare/{method}/{subset}/{metric}"] = first.aggregate[method][subset][metric]
    if "main" in reports and "pretrained" in reports:
        values[f"compare/pretrained_minus_main/{subset}/{metric}"] = (
            values[f"compare/pretrained/{subset}/{metric}"] - values[f"compare/main/{subset}/{metric}"])
    return values


def compare_step(
    report_paths: dict[str, Path],
    out_dir: Path,
    tracking: TrackingConfig,
    pipeline_run_id: str | None = None,
) -> Comparison:
    """Compare the evaluation reports (variant -> report.json or evaluation folder) into `out_dir`."""
    reports = {variant: load_report(path) for variant, path in report_paths.items()}
    out_dir = Path(out_dir)
    markdown, page = compare(reports, out_dir)
    comparison = Comparison(markdown=markdown, html=page, out_dir=out_dir, metrics=comparison_metrics(reports))
    with tracked_step(tracking, out_dir, "compare", pipeline_run_id, phase="compare") as tracker:
        tracker.log_metrics(comparison.metrics, step=0)
        tracker.log_artifact(out_dir / MARKDOWN_FILE, "comparison")
        tracker.log_artifact(out_dir / HTML_FILE, "comparison")
    return comparison
