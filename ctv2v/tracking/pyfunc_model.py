"""The registered model's code (MLflow "models from code"): MLflow copies this file into the logged model and runs
it at load time, instead of unpickling a cloudpickled object (https://mlflow.org/docs/latest/ml/model/models-from-code/).
Only MLflow imports it (ctv2v.tracking.pyfunc.log_pyfunc_model names it)."""

import mlflow

from ctv2v.tracking.pyfunc import ThinSliceModel

mlflow.models.set_model(ThinSliceModel())
