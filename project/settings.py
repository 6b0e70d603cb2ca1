"""Settings for the support-ticket service, read from the environment (README: Configuration)."""

from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from project.env import env_bool, env_float, env_int, env_list, env_rate, env_str
from support import rules

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env_list(
    "DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "support",
]

MIDDLEWARE = [
    "support.observability.RequestLogMiddleware",
    # JSON error answers outside the admin site, with debug on too (Django's technical pages
    # are HTML); outside the others, so it also sees the errors they raise.
    "support.middleware.JsonErrorsMiddleware",
    # Django's own middleware, subclassed to run its hooks without a thread hop each
    # (support/middleware.py); same behaviour.
    "support.middleware.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "support.middleware.DatabaseUnavailableMiddleware",
    "support.middleware.SessionMiddleware",
    "support.middleware.CommonMiddleware",
    "support.middleware.CsrfViewMiddleware",
    "support.middleware.AuthenticationMiddleware",
    "support.middleware.MessageMiddleware",
    "support.middleware.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"
# An API answers 404 for a path without its trailing slash rather than redirecting (a redirect
# would drop a POST body).
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DB_POOL_MIN_SIZE = env_int("DB_POOL_MIN_SIZE", 1, minimum=0)
DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 10, minimum=1)
DB_POOL_TIMEOUT = env_float("DB_POOL_TIMEOUT", 5.0, minimum=0.1)
DB_CONNECT_TIMEOUT = env_int("DB_CONNECT_TIMEOUT", 3, minimum=1)
DB_LOCK_TIMEOUT_MS = env_int("DB_LOCK_TIMEOUT_MS", 3000, minimum=0)
DB_STATEMENT_TIMEOUT_MS = env_int("DB_STATEMENT_TIMEOUT_MS", 15000, minimum=0)
# A session idle inside a transaction this long is ended by PostgreSQL (not a setting: a request
# never leaves its transaction idle).
DB_IDLE_IN_TRANSACTION_TIMEOUT_MS = 60000
SQLITE_BUSY_TIMEOUT = env_float("SQLITE_BUSY_TIMEOUT", 20.0, minimum=0)
# Threads per process for the requests' blocking work (project/handler.py): more than the
# database pool's connections would only wait for one.
SUPPORT_REQUEST_THREADS = env_int("SUPPORT_REQUEST_THREADS", DB_POOL_MAX_SIZE, minimum=1)
# What DATABASE_URL reaches: PostgreSQL itself ("none") or PgBouncer in transaction pooling
# ("pgbouncer"): no session state then, the timeouts come from the role (project/pooler.py).
DB_POOLER = env_str("DB_POOLER", "none")
if DB_POOLER not in ("none", "pgbouncer"):
    raise ImproperlyConfigured(f"DB_POOLER must be none or pgbouncer, got {DB_POOLER!r}")


def database_config(url: str, pooler: str = "none") -> dict:
    """Turn DATABASE_URL into Django's settings for the two supported engines.

    PostgreSQL goes through Django's psycopg 3 pool (CONN_MAX_AGE must stay 0 with a pool):
    at most DB_POOL_MAX_SIZE server connections per process, however many requests run.
    Its backend (``project.postgresql``) checks each connection on checkout itself and
    recovers from a restart or a mass disconnect at once (the module says how). Directly on
    PostgreSQL, the timeouts are set for each session at connection start; through PgBouncer
    (``pooler="pgbouncer"``) they are the role's, and nothing relies on a session
    (project/pooler.py says what and why).
    SQLite runs write transactions as BEGIN IMMEDIATE, so they serialize and the
    assignment guarantees hold without row locks.
    """
    config = dj_database_url.parse(url, conn_max_age=0)
    engine = config["ENGINE"]
    if engine == "django.db.backends.postgresql":
        config["ENGINE"] = "project.postgresql"
        # The backend checks connections on checkout; the pool's own check would run twice.
        config["CONN_HEALTH_CHECKS"] = False
        config["OPTIONS"] = {
            "pool": {
                "min_size": DB_POOL_MIN_SIZE,
                "max_size": DB_POOL_MAX_SIZE,
                "timeout": DB_POOL_TIMEOUT,
            },
            "connect_timeout": DB_CONNECT_TIMEOUT,
            "application_name": "support-tickets",
        }
        if pooler == "pgbouncer":
            # Each transaction may run on another server session: no statement prepared in
            # one (Django's client-side binding never prepares; None is Django's default too,
            # said here so that server_side_binding could not bring prepares back), no cursor
            # kept open across transactions (QuerySet.iterator() fetches in chunks without one).
            config["OPTIONS"]["prepare_threshold"] = None
            config["DISABLE_SERVER_SIDE_CURSORS"] = True
        else:
            config["OPTIONS"]["options"] = (
                f"-c lock_timeout={DB_LOCK_TIMEOUT_MS}"
                f" -c statement_timeout={DB_STATEMENT_TIMEOUT_MS}"
                f" -c idle_in_transaction_session_timeout={DB_IDLE_IN_TRANSACTION_TIMEOUT_MS}"
            )
    elif engine == "django.db.backends.sqlite3":
        if pooler != "none":
            raise ImproperlyConfigured(f"DB_POOLER={pooler} needs a PostgreSQL DATABASE_URL")
        config["OPTIONS"] = {
            "transaction_mode": "IMMEDIATE",
            "timeout": SQLITE_BUSY_TIMEOUT,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    else:
        raise ImproperlyConfigured(f"DATABASE_URL: unsupported engine {engine}")
    return config


DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}"
DATABASES = {"default": database_config(DATABASE_URL, DB_POOLER)}
# Each worker's one listening connection (support.live: LISTEN needs a session of its own, so
# it goes to PostgreSQL directly when DATABASE_URL goes through PgBouncer). Unset: the
# database of DATABASE_URL, as the app connects to it. With DB_POOLER=pgbouncer it must be
# given, and the migrations use it too (project.serve).
SUPPORT_LISTEN_DATABASE_URL = env_str("SUPPORT_LISTEN_DATABASE_URL") or ""
if DB_POOLER == "pgbouncer" and SUPPORT_LISTEN_DATABASE_URL in ("", DATABASE_URL):
    raise ImproperlyConfigured(
        "DB_POOLER=pgbouncer: set SUPPORT_LISTEN_DATABASE_URL to PostgreSQL itself (not "
        "PgBouncer): LISTEN and the migrations need a session of their own"
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth -----------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "support.api.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": ["support.api.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "EXCEPTION_HANDLER": "support.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_CLASSES": ["support.api.throttles.UserRateThrottle"],
    # The client address is REMOTE_ADDR, which uvicorn sets from the trusted proxy only.
    "NUM_PROXIES": 0,
}

# Tokens expire this long after login; POST /api/auth/logout/ revokes one sooner.
SUPPORT_TOKEN_TTL_SECONDS = env_int("SUPPORT_TOKEN_TTL_SECONDS", 7 * 24 * 3600, minimum=60)
# Rates: a count per period ("5/15min", "100/hour", "120/min"); empty: no limit. Logins:
# README "Roles and authentication" (only failed logins count toward the first two).
SUPPORT_THROTTLE_RATES = {
    # failures per username from one address: a guesser's own address is stopped soon
    "login_failures_username_address": env_rate(
        "SUPPORT_LOGIN_FAILURES_PER_USERNAME_ADDRESS", "5/15min", max_count=1000
    ),
    # failures per username from every address: bounds a guess spread over many addresses
    "login_failures_username": env_rate(
        "SUPPORT_LOGIN_FAILURES_PER_USERNAME", "100/hour", max_count=1000
    ),
    # every attempt per address (many names tried from one place); a team behind one NAT
    # logs in at the start of a shift
    "login_address": env_rate("SUPPORT_LOGIN_RATE_PER_ADDRESS", "120/min"),
    "user": env_rate("SUPPORT_USER_RATE", ""),
}
if env_str("SUPPORT_LOGIN_RATE_PER_USERNAME") is not None:
    raise ImproperlyConfigured(
        "SUPPORT_LOGIN_RATE_PER_USERNAME is gone: it counted every attempt, so anyone could lock "
        "an account. Failed logins are limited by SUPPORT_LOGIN_FAILURES_PER_USERNAME_ADDRESS "
        "and SUPPORT_LOGIN_FAILURES_PER_USERNAME (README: Configuration); unset it."
    )

# Throttle counters (and any other cache use) in a database table: shared by every worker
# process. Migration 0005 creates the table, so `migrate` is the only setup step.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "support_cache",
        # Past MAX_ENTRIES (300 by default) every write drops a third of the live entries:
        # a flood of names tried would wipe the counters of the names that matter.
        "OPTIONS": {"MAX_ENTRIES": 1_000_000},
    }
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Support tickets API",
    "DESCRIPTION": (
        "Admins create and manage tickets; agents pull work from a shared pool, at most "
        "SUPPORT_AGENT_MAX_TICKETS (15) each, and move them open -> assigned -> resolved -> "
        "closed. Authenticate with `Authorization: Token <key>` from POST /api/auth/token/."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/",  # tags: auth, tickets, agents, agent
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and ReDoc from drf-spectacular-sidecar: no CDN, works on closed networks.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "TicketStatusEnum": list(rules.STATUSES),
        "TicketPriorityEnum": ["low", "normal", "high", "urgent"],
        "AgentMoveEnum": list(rules.AGENT_TARGETS),
    },
}

# --- The product ----------------------------------------------------------------------------
SUPPORT_AGENT_MAX_TICKETS = env_int("SUPPORT_AGENT_MAX_TICKETS", 15, minimum=1)
SUPPORT_AGENTS_GROUP = "agents"
# The admin list counts a filter other than status only up to this many tickets
# (support.services.selectors.list_count): past it the answer says "at least this many".
SUPPORT_LIST_COUNT_LIMIT = env_int("SUPPORT_LIST_COUNT_LIMIT", 1_000, minimum=1)
# Idle release (README "Idle release and hand-back"): the assigned tickets of an agent silent
# for longer than this go back to the pool (support.services.idle_release). 0 or unset: off.
SUPPORT_AGENT_IDLE_RELEASE_SECONDS = env_int("SUPPORT_AGENT_IDLE_RELEASE_SECONDS", 0, minimum=0)
# How often each worker writes its agents' presence, one batched upsert (support.presence):
# the database sees a request up to this late. Recorded whether idle release is on or not,
# so that turning it on finds every agent's presence already there.
SUPPORT_PRESENCE_FLUSH_SECONDS = env_float(
    "SUPPORT_PRESENCE_FLUSH_SECONDS",
    min(30.0, SUPPORT_AGENT_IDLE_RELEASE_SECONDS / 4)
    if SUPPORT_AGENT_IDLE_RELEASE_SECONDS
    else 30.0,
    minimum=0.05,
)
if SUPPORT_AGENT_IDLE_RELEASE_SECONDS and (
    SUPPORT_PRESENCE_FLUSH_SECONDS * 2 > SUPPORT_AGENT_IDLE_RELEASE_SECONDS
):
    raise ImproperlyConfigured(
        "SUPPORT_PRESENCE_FLUSH_SECONDS must be at most half of "
        "SUPPORT_AGENT_IDLE_RELEASE_SECONDS: a request reaches the database up to one flush "
        "interval late, so agents polling more often than (idle - flush) seconds keep their "
        f"tickets; got flush {SUPPORT_PRESENCE_FLUSH_SECONDS}, idle "
        f"{SUPPORT_AGENT_IDLE_RELEASE_SECONDS}"
    )
# Wait for work (GET /api/agent/tickets/?wait=N): the longest wait a request may ask for, and
# how often waiters look at the pool while their worker's listening connection is down.
SUPPORT_WAIT_MAX_SECONDS = 60
SUPPORT_WAIT_POLL_SECONDS = env_float("SUPPORT_WAIT_POLL_SECONDS", 2.0, minimum=0.05)
# The event feed (GET /api/events/, support.api.feed): how often each worker's feed looks for
# new events while it has streams, how often a stream sends a heartbeat comment and checks its
# caller's token again, and how many recent events each worker keeps for its streams.
SUPPORT_EVENTS_POLL_SECONDS = env_float("SUPPORT_EVENTS_POLL_SECONDS", 0.1, minimum=0.01)
SUPPORT_EVENTS_HEARTBEAT_SECONDS = env_float("SUPPORT_EVENTS_HEARTBEAT_SECONDS", 15.0, minimum=0.1)
SUPPORT_EVENTS_BUFFER = env_int("SUPPORT_EVENTS_BUFFER", 10_000, minimum=1)
# Safe retries and edits (support.api.idempotency, support.api.conditional): how long a POST's
# Idempotency-Key and its answer are kept, and whether an admin's PUT/PATCH/DELETE of a ticket
# must carry If-Match (428 without).
SUPPORT_IDEMPOTENCY_TTL_SECONDS = env_int("SUPPORT_IDEMPOTENCY_TTL_SECONDS", 24 * 3600, minimum=1)
SUPPORT_REQUIRE_IF_MATCH = env_bool("SUPPORT_REQUIRE_IF_MATCH", False)
# The benchmark's framework floor at /bench/floor/ (bench/README.md); off in production.
SUPPORT_BENCH_ENDPOINTS = env_bool("SUPPORT_BENCH_ENDPOINTS", False)

# Request bodies larger than this are refused with 413 before Django reads them (project.asgi)
# and by Django itself.
MAX_REQUEST_BODY_BYTES = env_int("MAX_REQUEST_BODY_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BODY_BYTES

# --- HTTP, behind a TLS-terminating proxy ---------------------------------------------------
# The scheme comes from uvicorn, which applies X-Forwarded-Proto/-For only from the addresses
# in FORWARDED_ALLOW_IPS (the proxy; 127.0.0.1 by default). Django itself trusts no forwarded
# header, so a client that reaches uvicorn directly cannot pretend to be on HTTPS.
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SILENCED_SYSTEM_CHECKS = [
    # HSTS preload lists are an opt-in of the domain's owner: DJANGO_SECURE_HSTS_PRELOAD=1.
    "security.W021",
    # These three look for Django's own middleware by dotted path; MIDDLEWARE holds subclasses
    # of them (support/middleware.py), and support.checks runs Django's middleware checks
    # again as if it named the originals.
    "security.W001",
    "security.W002",
    "security.W003",
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# ServeStatic serves the admin's and the API docs' assets from the app (async middleware);
# straight from the apps' folders, so they work without a collectstatic step. nginx may serve
# STATIC_ROOT itself after collectstatic (deploy/).
SERVESTATIC_USE_FINDERS = True

# --- Logs, health, metrics -------------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOG_FORMAT = env_str("LOG_FORMAT", "text" if DEBUG else "json")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "project.logs.RequestIdFilter"},
        "unhandled_only": {"()": "project.logs.UnhandledOnly"},
    },
    "formatters": {
        "json": {
            "()": "project.logs.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
        "text": {
            "()": "project.logs.TextFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # SQL carries token keys and password hashes: never log it, whatever LOG_LEVEL says.
        "django.db.backends": {"level": "WARNING"},
        # One access line per request comes from support.request; Django's own lines for 4xx
        # and 5xx answers would repeat it: only crashes, with their traceback, pass.
        "django.request": {"level": "ERROR", "filters": ["unhandled_only"]},
        "httpx": {"level": "WARNING"},
    },
}

READYZ_TIMEOUT = env_float("READYZ_TIMEOUT", 2.0, minimum=0.1)
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_PUBLIC = env_bool("METRICS_PUBLIC", False)
