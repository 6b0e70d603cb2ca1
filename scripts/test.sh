#!/usr/bin/env bash
# Run the whole suite: lint, every test on a throwaway PostgreSQL, the smoke subset on SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv requirements/dev.txt

source scripts/system.sh
ensure_postgresql
# Debian's nginx (the deployment test), pgbouncer (the scale-out test), chromium (the
# admin-site browser test; Playwright drives it with executable_path=/usr/bin/chromium and
# downloads no browser of its own) and wrk (the benchmark's smoke test).
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install --no-install-recommends "${missing[@]}"
fi

ruff check .
ruff format --check .

start=$(date +%s)
python -m pytest "$@"
echo "== smoke run on SQLite, the default database =="
TEST_DATABASE=sqlite python -m pytest -m smoke "$@"
echo "suite time: $(( $(date +%s) - start )) s"
