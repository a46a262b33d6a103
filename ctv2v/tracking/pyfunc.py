"""The trained model as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(...)` gives thin slices.

The MLflow model wraps a trained-model folder (ctv2v.models.artifacts: VAE, denoiser, model.json with the
config), copied in as the artifact `trained_model`, together with the ctv2v code that loads it (code_paths). The
model object is built from code (ctv2v/tracking/pyfunc_model.py, MLflow's "models from code"), not unpickled.
Input: {"hu": float32 (slice, row, col) thick series in HU, "spacing_mm": float64 (3,) slice/row/col spacing};
output: the float32 thin series in HU, (n_thick - 1) * k + 1 slices, through ctv2v.evaluate.predict.Predictor
(the same tiled sampler as `evaluate` and `ctv2v predict`, same seed, so the results are equal).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec
from packaging.version import Version

import ctv2v
from ctv2v.config import TrackingConfig
from ctv2v.models.artifacts import read_model_meta
from ctv2v.tracking.offline import REMOTE_ERRORS, is_server_unreachable
from ctv2v.tracking.server import configure_client_http, existing_store

TRAINED_MODEL_ARTIFACT = "trained_model"
MLFLOW_MODEL_NAME = "model"
"""The logged model's name (MLflow 3 `name=`)."""
REQUIREMENTS = ("torch", "monai", "numpy", "nibabel", "pydicom", "pydantic", "pyyaml", "tqdm", "scipy")
"""What ctv2v's prediction imports; pinned to the public versions of the logging environment."""
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code file that builds ThinSliceModel when MLflow loads the model."""
EXAMPLE_THICK_SLICES = 4
"""The input example's thick slices: the sampler starts from a cubic interpolation, which needs 4."""
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), "hu"),
                   TensorSpec(np.dtype(np.float64), (3,), "spacing_mm")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
)


class ThinSliceModel(mlflow.pyfunc.PythonModel):
    """pyfunc: {"hu": thick HU (slice, row, col), "spacing_mm": (3,)} -> thin HU (slice, row, col)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the trained model (on CUDA when available) from the logged folder."""
        from ctv2v.evaluate.predict import Predictor

        self.predictor = Predictor(Path(context.artifacts[TRAINED_MODEL_ARTIFACT]))

    # No type hints on predict: MLflow would derive a schema of its own from them (SIGNATURE is the schema); it
    # warns once, at import, that they are missing.
    def predict(self, context, model_input, params=None):
        """The thin series (float32 HU) of one thick series."""
        spacing = tuple(float(value) for value in np.asarray(model_input["spacing_mm"]).reshape(-1))
        return self.predictor.predict(np.asarray(model_input["hu"]), spacing, source="pyfunc input").hu


def input_example(model_dir: Path) -> dict[str, np.ndarray]:
    """A small input the model predicts on: EXAMPLE_THICK_SLICES thick slices of 8 x 8 pixels going from air to
    water, at the model's smallest training thick spacing."""
    spacing = float(read_model_meta(model_dir)["thick_spacing_mm"][0])
    hu = np.repeat(np.linspace(-1000.0, 0.0, EXAMPLE_THICK_SLICES), 64).reshape(EXAMPLE_THICK_SLICES, 8, 8)
    return {"hu": hu.astype(np.float32), "spacing_mm": np.array([spacing, 1.0, 1.0])}


def pinned_requirements() -> list[str]:
    """`name==version` for REQUIREMENTS as installed here, without local version labels (torch's `+cpu`, which no
    public index serves): the same release installs from PyPI."""
    return [f"{name}=={Version(importlib.metadata.version(name)).public}" for name in REQUIREMENTS]


def model_metadata(model_dir: Path) -> dict[str, Any]:
    """What the MLmodel file says about the model (the full config is trained_model/resolved-config.yaml)."""
    meta = read_model_meta(model_dir)
    return {"ctv2v_variant": meta["variant"], "ctv2v_vae_weights": meta["vae_weights"],
            "ctv2v_thick_factor": meta["config"]["data"]["thick"]["factor"],
            "ctv2v_thick_spacing_mm": meta["thick_spacing_mm"], "ctv2v_phase": meta["phase"]}


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model) under `uri`; afterwards the caller's process is as it was.

    mlflow.set_tracking_uri writes both MLflow's module-level URI and the MLFLOW_TRACKING_URI variable, and the
    module-level URI wins over the variable: restoring with the *resolved* URI (get_tracking_uri) would pin it for
    the rest of the process, so the raw module value and the variable are saved and put back as they were.
    """
    from mlflow.tracking._tracking_service import utils as tracking_service

    previous_module_uri = tracking_service._tracking_uri
    previous_variable = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_module_uri)
        if previous_variable is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_variable


def log_pyfunc_model(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log the trained-model folder as a pyfunc model of run `run_id`; returns the logged model's id.

    The logged model is created for the run explicitly, so no fluent active run is needed (the step's run is
    managed by ctv2v.tracking.runs and must not be ended by MLflow's fluent API).
    """
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id)
    with _tracking_uri(tracking_uri):
        mlflow.pyfunc.log_model(
            name=MLFLOW_MODEL_NAME, model_id=logged.model_id, python_model=str(MODEL_CODE),
            artifacts={TRAINED_MODEL_ARTIFACT: str(model_dir)}, code_paths=[str(Path(ctv2v.__file__).parent)],
            signature=SIGNATURE, input_example=input_example(model_dir), pip_requirements=pinned_requirements(),
            metadata=model_metadata(model_dir),
        )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


class ModelLookupError(RuntimeError):
    """A models:/ URI could not be resolved or downloaded; the message names the URI and the tracking server."""


def download_trained_model(model_uri: str, tracking_uri: str | None, dst: Path,
                           tracking: TrackingConfig | None = None) -> Path:
    """The trained-model folder inside the MLflow model at `model_uri` (e.g. models:/ctv2v-main@champion),
    downloaded into `dst` from the tracking server `tracking_uri` (default: MLFLOW_TRACKING_URI).

    Requests are bounded like every tracking call (`tracking`'s HTTP timeout and retries, default TrackingConfig's),
    the registry is the same server, and a URI naming no existing store is refused (ctv2v.tracking.server.
    existing_store). Any failure to resolve or download is one ModelLookupError.
    """
    tracking = tracking or TrackingConfig()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ModelLookupError(f"{model_uri}: no tracking server to look it up in: give one (--tracking-uri) or set "
                               "MLFLOW_TRACKING_URI")
    existing_store(uri)
    configure_client_http(tracking)
    try:
        # MLflow resolves a models:/ name through the process-wide registry URI, whatever tracking_uri= says.
        with _tracking_uri(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst),
                                                             tracking_uri=uri))
    except REMOTE_ERRORS as exc:
        if is_server_unreachable(exc):
            reason = (f"no answer (timeout {tracking.request_timeout_s:g} s per request, retries "
                      f"{tracking.max_retries}): {_innermost(exc)}")
        else:
            reason = str(exc).splitlines()[0]
        raise ModelLookupError(f"{model_uri}: {reason} (tracking server {uri})") from exc
    flavor = Model.load(local).flavors.get("python_function", {})
    artifact = flavor.get("artifacts", {}).get(TRAINED_MODEL_ARTIFACT)
    if artifact is None or not (local / artifact["path"] / "model.json").is_file():
        raise FileNotFoundError(f"{model_uri}: not a ctv2v MLflow model (no pyfunc artifact "
                                f"{TRAINED_MODEL_ARTIFACT!r} holding model.json)")
    return local / artifact["path"]


def _innermost(exc: BaseException) -> str:
    """The first cause MLflow and requests wrapped `exc` around (e.g. "Connection refused"), as one line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
