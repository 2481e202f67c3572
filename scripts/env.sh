#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
# Usage: bash scripts/env.sh surgeon demo --out demo_out
#        bash scripts/env.sh pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.surgeon-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  # A pinned torch first: on a CPU machine this release is a local CPU build; set
  # SURGEON_TORCH to another requirement (e.g. "torch>=2.6") to choose your own build.
  "$venv/bin/pip" install -q "${SURGEON_TORCH:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/pip" install -q -e "$root[dev]" 2>&1 | grep -v '^WARNING: Location' || true
  "$venv/bin/python" -c "import surgeon, torch, transformers, peft" 
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
