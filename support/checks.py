"""System checks for what MIDDLEWARE's subclasses of Django's middleware change.

Django's security deploy checks find its middleware by dotted path; MIDDLEWARE lists
subclasses of it (support/middleware.py), so Django skips every check that depends on one of
them (HSTS, SSL redirect, nosniff, secure CSRF and session cookies...). They are run here
again as if MIDDLEWARE named Django's own classes. Django's three "is it installed" warnings
(security.W001-W003) are silenced in settings; these runs report them when the subclass is
missing.
"""

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.checks.security import base, csrf, sessions
from django.test.utils import override_settings

PARENTS = {
    "support.middleware.SecurityMiddleware": "django.middleware.security.SecurityMiddleware",
    "support.middleware.XFrameOptionsMiddleware": (
        "django.middleware.clickjacking.XFrameOptionsMiddleware"
    ),
    "support.middleware.CsrfViewMiddleware": "django.middleware.csrf.CsrfViewMiddleware",
    "support.middleware.SessionMiddleware": "django.contrib.sessions.middleware.SessionMiddleware",
}

# Django's deploy checks that look for its middleware in MIDDLEWARE.
BY_MIDDLEWARE = (
    base.check_security_middleware,
    base.check_xframe_options_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_xframe_deny,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_middleware,
    csrf.check_csrf_cookie_secure,
    sessions.check_session_cookie_secure,
    sessions.check_session_cookie_httponly,
)


@register(Tags.security, deploy=True)
def django_security_checks(app_configs, **kwargs):
    as_django = [PARENTS.get(path, path) for path in settings.MIDDLEWARE]
    if as_django == list(settings.MIDDLEWARE):
        return []  # Django's own classes: its checks already ran on them
    with override_settings(MIDDLEWARE=as_django):
        return [message for check in BY_MIDDLEWARE for message in check(app_configs)]


@register(Tags.compatibility)
def session_work_stays_in_threads(app_configs, **kwargs):
    """support/middleware.py runs session hooks on the event loop and sends saving to a thread
    only when the session was used; these settings would touch the database from the loop."""
    errors = []
    if settings.SESSION_SAVE_EVERY_REQUEST:
        errors.append(Error("SESSION_SAVE_EVERY_REQUEST is not supported.", id="support.E001"))
    if settings.CSRF_USE_SESSIONS:
        errors.append(Error("CSRF_USE_SESSIONS is not supported.", id="support.E002"))
    return errors


@register(Tags.database, deploy=True)
def pooler_session_settings(app_configs, **kwargs):
    """Through PgBouncer the timeouts are the role's defaults (project/pooler.py): read them
    through it and compare them with DB_LOCK_TIMEOUT_MS / DB_STATEMENT_TIMEOUT_MS."""
    if settings.DB_POOLER != "pgbouncer":
        return []
    from project import pooler

    hint = f"On PostgreSQL: {pooler.fix_sql()} Then RECONNECT on PgBouncer's console."
    return [
        Error(problem, hint=hint, id="support.E003")
        for problem in pooler.session_settings_problems()
    ]
