#!/usr/bin/env bash
# The benchmark (bench/README.md): installs what it needs, then runs bench/run.py.
#   bash bench/run.sh            # the full run (about 15 minutes), writes docs/benchmarks.*
#   bash bench/run.sh --quick    # a smoke run: 2 s per scenario, no sweep, no scale
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv requirements/dev.txt

source scripts/system.sh
ensure_postgresql
command -v wrk >/dev/null || apt_install --no-install-recommends wrk
exec python -m bench.run "$@"
