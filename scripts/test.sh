#!/usr/bin/env bash
# Run the whole suite: lint, every test on a throwaway PostgreSQL, the smoke subset on SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "test,bench"

# PostgreSQL server binaries (initdb, pg_ctl) for the throwaway test cluster.
if ! command -v pg_ctl >/dev/null && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
    echo "Installing PostgreSQL server binaries (apt-get)..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# Debian's nginx (the deployment test), chromium (the admin-site browser test; Playwright
# drives it with executable_path=/usr/bin/chromium and downloads no browser of its own) and
# wrk (the benchmark's smoke test).
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    echo "Installing ${missing[*]} (apt-get)..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# As root, the test cluster runs as the postgres user (PostgreSQL refuses to run as root).
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
fi

ruff check .
ruff format --check .

start=$(date +%s)
python -m pytest "$@"
echo "== smoke run on SQLite, the default database =="
TEST_DATABASE=sqlite python -m pytest -m smoke "$@"
echo "suite time: $(( $(date +%s) - start )) s"
