#!/usr/bin/env bash
# The benchmark (bench/README.md): installs what it needs, then runs bench/run.py.
#   bash bench/run.sh            # the full run (about 15 minutes), writes docs/benchmarks.*
#   bash bench/run.sh --quick    # a smoke run: 2 s per scenario, no sweep, no scale
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "test,bench"

missing=()
command -v wrk >/dev/null || missing+=(wrk)
if ! command -v pg_ctl >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing ${missing[*]} (apt-get)..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# As root, the throwaway cluster runs as the postgres user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
fi
exec python -m bench.run "$@"
