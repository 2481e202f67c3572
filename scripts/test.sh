#!/usr/bin/env bash
# The test suite with all its set-up: Debian's Chromium (the HTML graph view's browser test) and
# Graphviz (SVG export) when missing, then the venv (scripts/env.sh), then pytest.
#
#   bash scripts/test.sh                          # the pinned toolchain, as CI runs it
#   SURGEON_UNPINNED=1 bash scripts/test.sh       # against the newest releases
#   bash scripts/test.sh -p random_order --random-order   # in a random order
#
# It says what it installs before installing it. SURGEON_SKIP_APT=1 installs nothing with apt (the
# browser and SVG tests then skip); an apt install that is tried and fails stops with exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v dot >/dev/null || need+=(graphviz)
if [ ${#need[@]} -gt 0 ]; then
  if [ "${SURGEON_SKIP_APT:-0}" = 1 ]; then
    echo "test.sh: SURGEON_SKIP_APT=1: not installing ${need[*]}; the browser and SVG tests will skip" >&2
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing with apt-get: ${need[*]} (the browser test of the HTML graph view, SVG export)" >&2
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; } \
        >"$apt_log" 2>&1; then
      echo "test.sh: apt-get install ${need[*]} failed; the last lines:" >&2
      tail -n 15 "$apt_log" | sed 's/^/  | /' >&2
      echo "test.sh: rerun, or set SURGEON_SKIP_APT=1 to test without them" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "test.sh: ${need[*]} missing and not installable here (needs root and apt-get);" \
         "the browser and SVG tests will skip" >&2
  fi
fi
exec bash scripts/env.sh python -m pytest "$@"
