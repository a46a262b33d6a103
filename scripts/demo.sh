#!/usr/bin/env bash
# The main job on the embedded demo data (real CT from the TotalSegmentator sdist), on CPU: the whole KFP DAG
# under kfp.local, both branches, ending in the compare table. Offline, MAISI's published weights cannot be
# fetched, so the pretrained branch uses a random-weight checkpoint of MAISI's exact layout (`--weights
# stand-in`), labelled so in every table and MLflow tag. Runs are tracked in a local MLflow store unless
# MLFLOW_TRACKING_URI names a server. main.yaml gives the design (the flow from the interpolation's latent,
# residual decoding, data consistency), smoke.yaml the CPU-minutes sizes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$root"
mkdir -p workspace
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$root/workspace/mlflow.db}"
exec ctv2v pipeline run-local --config configs/main.yaml --config configs/smoke.yaml --weights stand-in --out workspace/demo "$@"
