#!/usr/bin/env bash
# The test suite, with all its set-up: Debian's Chromium (the HTML graph view's browser test)
# and Graphviz (SVG export) when missing and installable, then the venv, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || ! command -v dot >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium graphviz >/dev/null; } \
      || echo "warning: could not install chromium/graphviz; the browser and SVG tests will skip" >&2
  else
    echo "note: chromium/graphviz missing and not installable here; the browser and SVG tests will skip" >&2
  fi
fi
exec bash scripts/env.sh python -m pytest "$@"
