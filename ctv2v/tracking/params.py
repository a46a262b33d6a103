"""MLflow params over MLflow's length limit: truncated with a marker that says where the full value is (the
artifact `params/mlflow-long-params.json`)."""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

LONG_PARAMS_FILE = "mlflow-long-params.json"
"""Full values of params longer than MLflow's limit, uploaded as an artifact beside the truncated params."""


def fit_params(values: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(every param as MLflow takes it, the full values of those that had to be truncated)."""
    fitted, long = {}, {}
    for key, value in values.items():
        if len(value) > MAX_PARAM_VAL_LENGTH:
            long[key] = value
            marker = f"... [{len(value)} chars; full value in artifact params/{LONG_PARAMS_FILE}]"
            value = value[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
        fitted[key] = value
    return fitted, long
