#!/usr/bin/env bash
# Run the service on the SQLite default with demo data: installs, migrates, seeds, serves.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv requirements/prod.txt

export DJANGO_DEBUG="${DJANGO_DEBUG:-1}"
python manage.py migrate --noinput
python manage.py seed_demo
port="${PORT:-8000}"
echo
echo "Serving on http://127.0.0.1:$port/  (try: curl -H 'Authorization: Token <token>' http://127.0.0.1:$port/api/agent/tickets/)"
exec python -m project.serve --no-migrate --host 127.0.0.1 --port "$port"
