#!/usr/bin/env bash
# The main job on the embedded demo data (real CT from the TotalSegmentator sdist), on CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$root"
ctv2v data fetch-demo
exec ctv2v data baselines --config configs/smoke.yaml "$@"
