# The ticket service: uvicorn with N workers, migrations on start, PostgreSQL via DATABASE_URL.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_DEBUG=0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    FORWARDED_ALLOW_IPS=127.0.0.1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/support-metrics

WORKDIR /app
RUN useradd --create-home --uid 10001 app

COPY pyproject.toml README.md manage.py ./
COPY project ./project
COPY support ./support
RUN pip install --no-cache-dir . \
    && DJANGO_SECRET_KEY=build-only python manage.py collectstatic --noinput

# The socket folder shared with nginx (docker-compose.yml): Docker copies this ownership into
# the fresh volume, so the non-root app can create its socket there.
RUN mkdir -p /run/support && chown app:app /run/support

USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"

# The same commands the README gives for production.
# PROMETHEUS_MULTIPROC_DIR is emptied first: samples of a previous run must not be added up.
CMD ["sh", "-c", "DB_STATEMENT_TIMEOUT_MS=0 python manage.py migrate --noinput && rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec uvicorn project.asgi:application --host 0.0.0.0 --port \"$PORT\" --workers \"$WEB_CONCURRENCY\" --lifespan off --proxy-headers"]
