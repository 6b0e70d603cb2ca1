"""Deploy checks standing in for three of Django's: security.W001-W003 look for Django's own
middleware by its dotted path, and MIDDLEWARE lists subclasses of it (support/middleware.py)."""

from django.conf import settings
from django.core.checks import Tags, Warning, register

REPLACED = {
    "support.middleware.SecurityMiddleware": "support.W001",
    "support.middleware.XFrameOptionsMiddleware": "support.W002",
    "support.middleware.CsrfViewMiddleware": "support.W003",
}


@register(Tags.security, deploy=True)
def middleware_present(app_configs, **kwargs):
    return [
        Warning(
            f"{path} is not in MIDDLEWARE: its security headers or CSRF protection are off.",
            id=check_id,
        )
        for path, check_id in REPLACED.items()
        if path not in settings.MIDDLEWARE
    ]
