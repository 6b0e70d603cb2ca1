from django.apps import AppConfig


class SupportConfig(AppConfig):
    name = "support"
    verbose_name = "Support tickets"

    def ready(self):
        from support import checks  # noqa: F401  (registers the deploy checks)
