# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and install the project into it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.ctv2v-installed"
constraints="$root/images/constraints.txt"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$constraints" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    # The same pinned versions the images install (images/constraints.txt), so tests run what ships.
    "$venv/bin/python" -m pip install --quiet --constraint "$constraints" -e "$root[server,test]"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
