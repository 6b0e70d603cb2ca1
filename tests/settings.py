"""Test settings: the project's settings on a throwaway PostgreSQL, or SQLite for the smoke run.

TEST_DATABASE=sqlite runs on SQLite (a file, so that parallel requests share it); otherwise
DATABASE_URL when given, else a PostgreSQL cluster this test session starts itself.
"""

import os
import tempfile

os.environ.setdefault(
    "DJANGO_SECRET_KEY", "test-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"
)
os.environ.setdefault("DB_POOL_MAX_SIZE", "40")
os.environ.setdefault("DB_POOL_TIMEOUT", "10")

if os.environ.get("TEST_DATABASE") == "sqlite":
    os.environ["DATABASE_URL"] = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "test.sqlite3")
elif not os.environ.get("DATABASE_URL"):
    from tests.pg_cluster import start_cluster

    CLUSTER = start_cluster()
    os.environ["DATABASE_URL"] = CLUSTER.url("support")

from project.settings import *  # noqa: F403
from project.settings import DATABASES

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}

# Hashing passwords properly is slow by design; the tests create many users.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SECURE_SSL_REDIRECT = False
# Throttle counters live in the database cache, which test flushes do not empty: generous
# limits here (failed logins not limited); the throttling tests set tight ones with
# override_settings.
SUPPORT_THROTTLE_RATES = {
    "login_failures_username_address": None,
    "login_failures_username": None,
    "login_address": "1000/min",
    "user": None,
}
