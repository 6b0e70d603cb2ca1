#!/usr/bin/env bash
# The benchmark (bench/README.md): installs what it needs, then runs bench/run.py.
#   bash bench/run.sh            # the full run (about 25 minutes), writes docs/benchmarks.*
#   bash bench/run.sh --quick    # a smoke run: 2 s per scenario, no sweep, no scale
#   bash bench/run.sh --python /usr/bin/python3.11   # the service on that interpreter too
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv requirements/dev.txt

source scripts/system.sh
ensure_postgresql
command -v wrk >/dev/null || apt_install --no-install-recommends wrk

# Each --python interpreter gets a venv (bench/interpreter.py): Debian's python3.X makes one
# only with its python3.X-venv package.
previous=""
for arg in "$@"; do
    other=""
    [ "$previous" = --python ] && other="$arg"
    [[ "$arg" == --python=* ]] && other="${arg#--python=}"
    previous="$arg"
    [ -n "$other" ] || continue
    if ! "$other" -c 'import ensurepip, venv' 2>/dev/null && command -v dpkg-query >/dev/null; then
        apt_install "python$("$other" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    fi
done
exec python -m bench.run "$@"
