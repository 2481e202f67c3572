#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating (or finishing) it first.
#
#   bash scripts/env.sh surgeon demo --out demo_out
#   bash scripts/env.sh python -m pytest
#
# The test toolchain is pinned by constraints/dev.txt: a fresh clone gets the versions CI tested.
#   SURGEON_UNPINNED=1  the newest releases instead, in a venv of their own (.venv-latest)
#   SURGEON_TORCH=...   the torch requirement (default torch==2.13.0, a CPU build on the CI machine;
#                       e.g. "torch>=2.6" keeps a CUDA build you have); triton then follows torch
# Each install step is logged to <venv>/install.log. A step that fails stops here with its reason
# and exit status 1; a rerun skips the steps already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_req="${SURGEON_TORCH:-torch==2.13.0}"
if [ "${SURGEON_UNPINNED:-0}" = 1 ]; then
  venv="$root/.venv-latest"
else
  venv="$root/.venv"
fi
log="$venv/install.log"

step() {   # step NAME STAMP-KEY COMMAND...: run COMMAND unless this step already ran with this key
  local name="$1" key="$2"; shift 2
  local slug
  slug="$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.=-' '-')"   # a file name: no '/', spaces or brackets
  local stamp="$venv/.surgeon-step-$slug"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    return 0
  fi
  echo "env.sh: $name" >&2
  if ! "$@" >>"$log" 2>&1; then
    echo "env.sh: '$name' failed; the last lines of $log:" >&2
    tail -n 15 "$log" | sed 's/^/  | /' >&2
    echo "env.sh: fix the cause and run the same command again: the steps already done are kept" >&2
    exit 1
  fi
  printf '%s' "$key" >"$stamp"
}

if [ ! -x "$venv/bin/python" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "env.sh: could not create $venv with python3 -m venv" >&2; exit 1; }
fi
py="$venv/bin/python"
step "upgrade pip" "1" "$py" -m pip install --upgrade pip
step "install $torch_req" "$torch_req" "$py" -m pip install "$torch_req"
if [ "${SURGEON_UNPINNED:-0}" = 1 ]; then
  deps_key="latest $(date +%F) $(cat "$root/pyproject.toml" | cksum)"
  step "install surgeon[dev], newest releases" "$deps_key" \
    "$py" -m pip install --upgrade --upgrade-strategy eager -e "$root[dev]"
else
  constraints="$venv/constraints.txt"
  if [ -n "${SURGEON_TORCH:-}" ]; then   # your torch picks its own triton
    grep -v '^triton==' "$root/constraints/dev.txt" >"$constraints"
  else
    cp "$root/constraints/dev.txt" "$constraints"
  fi
  deps_key="$(cat "$root/pyproject.toml" "$constraints" | cksum) $torch_req"
  step "install surgeon[dev] with constraints/dev.txt" "$deps_key" \
    "$py" -m pip install -c "$constraints" -e "$root[dev]"
fi
# timm (the reparameterization tests against timm's own) needs torchvision, whose wheel for the pinned
# torch is a CUDA build whose C library does not load on a CPU-only machine; installed in the venv, it
# would break `import transformers`. So the three go to a folder of their own, without dependencies
# (they cannot replace torch); only the tests that use timm look there (tests/timm_models.py).
# Only with the pinned torch, which this torchvision pairs with; those tests skip where it is missing.
if [ "$torch_req" = "torch==2.13.0" ]; then
  timm_pins="timm==1.0.31 torchvision==0.28.0 pillow==13.0.0"
  step "install timm into $venv/extras/timm" "$timm_pins" \
    "$py" -m pip install --no-deps --upgrade --target "$venv/extras/timm" $timm_pins
fi
step "check imports" "$deps_key" "$py" -c "import surgeon, torch, transformers, peft"

export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
