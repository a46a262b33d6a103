"""Side-by-side comparison of evaluation reports (`main` vs `pretrained`), as Markdown and HTML.

Two reports are comparable only when they scored the same test volumes of the same manifest, in the same HU
window, from thick series made the same way: otherwise a PSNR difference could come from the data rather than
the VAE (the HU window alone moves PSNR by ~6 dB). `compare` refuses anything else with one error listing
every mismatch. The baselines depend only on the data, so they must agree between reports; each model row is
shown next to them (with data consistency, their `+dc` forms too) so a reader sees whether each model beats
linear interpolation and the best non-learned reference.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ctv2v.config import VARIANTS
from ctv2v.evaluate.evaluate import LEARNED_METHODS, MODEL, MODEL_ADAPTED, REPORT_FILE, STAND_IN_WARNING, EvaluationReport
from ctv2v.evaluate.metrics import HEADLINE, METRICS, SLICE_SETS, column_label
from ctv2v.files import atomic_write_text

COLUMNS = [(metric, slice_set) for metric in METRICS for slice_set in SLICE_SETS]
"""The table's metric columns: every metric of the table (ctv2v.evaluate.metrics) over each slice set."""
TIE_DB = 0.01
"""PSNR differences below this are reported as a match: the table prints two decimals."""
BASELINE_TOLERANCE = 1e-6
"""Relative tolerance when checking that two reports' baselines (the same data, no randomness) agree."""
VARIANT_ORDER = VARIANTS
MARKDOWN_FILE = "comparison.md"
HTML_FILE = "comparison.html"


class ComparisonError(ValueError):
    """Reports that cannot be compared honestly; the message lists every mismatch."""


def load_report(path: Path) -> EvaluationReport:
    """An evaluation report from `path`, or from `path/report.json` when `path` is an evaluation folder."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        return EvaluationReport.read(path)
    except OSError as exc:
        raise ComparisonError(f"{path}: cannot read evaluation report ({exc.strerror})") from exc
    except ValueError as exc:
        raise ComparisonError(str(exc)) from exc


def _ordered(reports: dict[str, EvaluationReport]) -> list[str]:
    known = [v for v in VARIANT_ORDER if v in reports]
    return known + sorted(v for v in reports if v not in VARIANT_ORDER)


def check_comparable(reports: dict[str, EvaluationReport]) -> None:
    """Raise ComparisonError unless the reports share manifest, HU window, thick method and test volumes."""
    if len(reports) < 2:
        raise ComparisonError(f"a comparison needs at least two reports, got {len(reports)}: {sorted(reports)}")
    problems = []
    for variant, report in reports.items():
        if report.variant != variant:
            problems.append(f"report given as '{variant}' was made by variant '{report.variant}'")
    variants = _ordered(reports)
    first = reports[variants[0]]
    fields = [
        ("manifest_sha256", "manifest"),
        ("hu_range", "HU range"),
        ("thick", "thick-slice method"),
        ("volume_ids", "test volumes"),
    ]
    for key, what in fields:
        for variant in variants[1:]:
            if getattr(reports[variant], key) != getattr(first, key):
                problems.append(f"{what} differs: {variants[0]} has {getattr(first, key)!r}, "
                                f"{variant} has {getattr(reports[variant], key)!r}")
    if not problems:
        problems.extend(_baseline_mismatches(reports, variants))
    if problems:
        raise ComparisonError("evaluation reports are not comparable: " + "; ".join(problems))


def _baseline_mismatches(reports: dict[str, EvaluationReport], variants: list[str]) -> list[str]:
    first = reports[variants[0]].aggregate
    problems = []
    for variant in variants[1:]:
        other = reports[variant].aggregate
        if set(first) - set(LEARNED_METHODS) != set(other) - set(LEARNED_METHODS):
            problems.append(f"scored references differ (evaluation.data_consistency?): {variants[0]} has "
                            f"{sorted(set(first) - set(LEARNED_METHODS))}, {variant} has "
                            f"{sorted(set(other) - set(LEARNED_METHODS))}")
        for method in sorted(set(first) & set(other) - set(LEARNED_METHODS)):
            for metric, slice_set in COLUMNS:
                a, b = first[method][slice_set][metric.name], other[method][slice_set][metric.name]
                if not math.isclose(a, b, rel_tol=BASELINE_TOLERANCE, abs_tol=BASELINE_TOLERANCE):
                    problems.append(
                        f"baseline '{method}' {metric.name} ({slice_set}) is {a!r} in {variants[0]} but {b!r} in "
                        f"{variant}: the reports did not score the same data"
                    )
    return problems


def _rows(reports: dict[str, EvaluationReport], variants: list[str]) -> list[tuple[str, str, dict]]:
    """(method label, weights label, aggregate metrics) rows: each model, then each baseline once."""
    rows = []
    for variant in variants:
        report = reports[variant]
        rows.append((f"{variant} model", report.weights_display, report.aggregate[MODEL]))
        if MODEL_ADAPTED in report.aggregate:
            rows.append((f"{variant} model+adapt", f"{report.weights_display}, adapted to each test scan",
                         report.aggregate[MODEL_ADAPTED]))
    first = reports[variants[0]]
    for method in _references(first):
        weights = "no learning, projected onto the thick slices" if method.endswith("+dc") else "no learning"
        rows.append((f"{method} interpolation", weights, first.aggregate[method]))
    return rows


def _references(report: EvaluationReport) -> list[str]:
    """The non-learned methods a report scored: the baselines, then (with data consistency) their `+dc` forms."""
    return [method for method in report.aggregate if method not in LEARNED_METHODS]


def _headline(metrics: dict) -> float:
    metric, slice_set = HEADLINE
    return metrics[slice_set][metric]


def _per_volume_headline(report: EvaluationReport, method: str) -> dict[str, float]:
    metric, slice_set = HEADLINE
    return {volume.id: volume.metrics[method][slice_set][metric] for volume in report.volumes}


def _verb(diff_db: float) -> str:
    if abs(diff_db) < TIE_DB:
        return "matches"
    return "beats" if diff_db > 0 else "does not beat"


def verdicts(reports: dict[str, EvaluationReport]) -> list[str]:
    """Plain sentences: does each model beat linear interpolation and the best non-learned reference (with data
    consistency, the `+dc` baselines count), and does `pretrained` beat `main`."""
    variants = _ordered(reports)
    lines = []
    for variant in variants:
        report = reports[variant]
        model = _headline(report.aggregate[MODEL])
        references = {method: _headline(report.aggregate[method]) for method in _references(report)}
        best = max(references, key=references.get, default=None)
        for method in dict.fromkeys(name for name in ("linear", best) if name in references):
            label = "the best non-learned reference, " if method == best else ""
            lines.append(
                f"{variant} ({report.weights_display}) {_verb(model - references[method])} {label}{method} "
                f"interpolation: {model:.2f} vs {references[method]:.2f} dB PSNR on synthesized slices "
                f"({model - references[method]:+.2f} dB)."
            )
    if "main" in reports and "pretrained" in reports:
        main, pre = reports["main"], reports["pretrained"]
        diff = _headline(pre.aggregate[MODEL]) - _headline(main.aggregate[MODEL])
        per_main, per_pre = _per_volume_headline(main, MODEL), _per_volume_headline(pre, MODEL)
        wins = sum(per_pre[v] - per_main[v] >= TIE_DB for v in per_main)
        ties = sum(abs(per_pre[v] - per_main[v]) < TIE_DB for v in per_main)
        volumes = f"{len(per_main)} test volume" + ("s" if len(per_main) != 1 else "")
        lines.append(
            f"pretrained {_verb(diff)} main: {diff:+.2f} dB PSNR on synthesized slices (mean over {volumes}; "
            f"pretrained is better on {wins}, level on {ties} of {len(per_main)})."
        )
        if len(per_main) < 5:
            lines.append(f"With only {volumes}, the difference says little about new patients.")
    for variant in variants:
        if reports[variant].weights == "stand-in":
            lines.append(f"WARNING ({variant}): {STAND_IN_WARNING}.")
    return lines


def _settings(reports: dict[str, EvaluationReport], variants: list[str]) -> list[tuple[str, str]]:
    first = reports[variants[0]]
    hu_min, hu_max = first.hu_range
    thick = first.thick
    steps = ", ".join(f"{v}: {reports[v].sample_steps}" for v in variants)
    descriptions = sorted({volume.thick_description for volume in first.volumes})
    return [
        ("HU range (metrics)", f"[{hu_min:g}, {hu_max:g}]"),
        ("Thick slices", f"{thick['method']} x{thick['factor']}: " + "; ".join(descriptions)),
        ("Sampling steps", steps),
        ("Model input window (HU)", "; ".join(
            f"{v}: [{reports[v].model_intensity_window[0]:g}, {reports[v].model_intensity_window[1]:g}]"
            for v in variants)),
        ("Weights", "; ".join(f"{v}: {reports[v].weights_display}" for v in variants)),
        ("Test volumes", f"{first.n_volumes} ({', '.join(first.volume_ids)})"),
        ("Manifest sha256", first.manifest_sha256),
        ("Averaging", first.aggregate_over),
    ]


def to_markdown(reports: dict[str, EvaluationReport]) -> str:
    """The comparison as a Markdown document (settings, table, verdicts)."""
    variants = _ordered(reports)
    header_models = " vs ".join(f"{v} [{reports[v].weights_display}]" for v in variants)
    lines = [f"# ctv2v evaluation: {header_models}", ""]
    lines += [f"- **{name}**: {value}" for name, value in _settings(reports, variants)]
    lines += ["", "| method | weights | " + " | ".join(column_label(m, s) for m, s in COLUMNS) + " |",
              "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for label, weights, metrics in _rows(reports, variants):
        cells = [metric.format(metrics[slice_set][metric.name]) for metric, slice_set in COLUMNS]
        lines.append(f"| {label} | {weights} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdict", ""] + [f"- {line}" for line in verdicts(reports)] + [""]
    return "\n".join(lines)


def to_html(reports: dict[str, EvaluationReport]) -> str:
    """The comparison as a standalone HTML page (the same content as the Markdown)."""
    variants = _ordered(reports)
    esc = html.escape
    header_models = " vs ".join(f"{v} [{reports[v].weights_display}]" for v in variants)
    settings = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _settings(reports, variants))
    head = "".join(f"<th>{esc(column_label(m, s))}</th>" for m, s in COLUMNS)
    body = ""
    for label, weights, metrics in _rows(reports, variants):
        cells = "".join(f"<td>{m.format(metrics[s][m.name])}</td>" for m, s in COLUMNS)
        body += f"<tr><th>{esc(label)}</th><td>{esc(weights)}</td>{cells}</tr>"
    verdict = "".join(f"<li>{esc(line)}</li>" for line in verdicts(reports))
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ctv2v evaluation</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #bbb;padding:4px 8px}td{text-align:right}th{text-align:left}"
        "</style></head><body>"
        f"<h1>ctv2v evaluation: {esc(header_models)}</h1>"
        f"<table>{settings}</table>"
        f"<table><tr><th>method</th><th>weights</th>{head}</tr>{body}</table>"
        f"<h2>Verdict</h2><ul>{verdict}</ul></body></html>"
    )


def compare(reports: dict[str, EvaluationReport], out_dir: Path) -> tuple[str, str]:
    """Check the reports are comparable, write MARKDOWN_FILE and HTML_FILE into `out_dir`, return (markdown, html)."""
    check_comparable(reports)
    markdown, page = to_markdown(reports), to_html(reports)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / MARKDOWN_FILE, markdown)
    atomic_write_text(out_dir / HTML_FILE, page)
    return markdown, page
