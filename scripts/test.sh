#!/usr/bin/env bash
# Run the test suite in the project's virtual environment (created or reused by scripts/venv.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$root"
exec python -m pytest "$@"
