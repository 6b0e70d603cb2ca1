# The ticket service: python -m project.serve (migrations, then uvicorn with $WEB_CONCURRENCY
# workers on $PORT), PostgreSQL via DATABASE_URL. tests/test_production.py runs these RUN steps,
# the CMD and the HEALTHCHECK outside Docker.
# The Python the lock files are resolved for (scripts/lock.sh, CI).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_DEBUG=0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    FORWARDED_ALLOW_IPS=127.0.0.1

WORKDIR /app
RUN useradd --create-home --uid 10001 app

# The pinned dependencies first (a layer that changes only with the lock file), then the code.
COPY requirements/prod.txt ./requirements/prod.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/prod.txt
COPY manage.py ./
COPY project ./project
COPY support ./support
# The code runs from /app (no install of the project: nothing unpinned is fetched).
RUN DJANGO_SECRET_KEY=build-only python manage.py collectstatic --noinput

# The socket folder shared with nginx (docker-compose.yml): Docker copies this ownership into
# the fresh volume, so the non-root app can create its socket there.
RUN mkdir -p /run/support && chown app:app /run/support

USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"

# The README's production entry point; the workers' metrics folder is made per run.
CMD ["python", "-m", "project.serve", "--host", "0.0.0.0"]
