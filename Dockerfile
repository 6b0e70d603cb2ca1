# The ticket service: uvicorn with N workers, migrations on start, PostgreSQL via DATABASE_URL.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_DEBUG=0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    FORWARDED_ALLOW_IPS=127.0.0.1

WORKDIR /app
RUN useradd --create-home --uid 10001 app

COPY pyproject.toml README.md manage.py ./
COPY project ./project
COPY support ./support
RUN pip install --no-cache-dir . \
    && DJANGO_SECRET_KEY=build-only python manage.py collectstatic --noinput

USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"

# The same commands the README gives for production.
CMD ["sh", "-c", "DB_STATEMENT_TIMEOUT_MS=0 python manage.py migrate --noinput && exec uvicorn project.asgi:application --host 0.0.0.0 --port \"$PORT\" --workers \"$WEB_CONCURRENCY\" --lifespan off --proxy-headers"]
