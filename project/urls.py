from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from support.api.metrics import MetricsView

urlpatterns = [
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The docs pages load nothing from outside the app (support/templates/api_docs/).
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(url_name="schema", template_name="api_docs/swagger_ui.html"),
        name="swagger-ui",
    ),
    path(
        "api/redoc/",
        SpectacularRedocView.as_view(url_name="schema", template_name="api_docs/redoc.html"),
        name="redoc",
    ),
    path("admin/", admin.site.urls),
    path("api/", include("support.api.urls")),
    path("api-auth/", include("rest_framework.urls")),
    path("metrics", MetricsView.as_view(), name="metrics"),
]

if settings.SUPPORT_BENCH_ENDPOINTS:
    from support.api.floor import FloorView

    urlpatterns.append(path("bench/floor/", FloorView.as_view()))

handler400 = "support.api.views_errors.bad_request"
handler404 = "support.api.views_errors.not_found"
handler500 = "support.api.views_errors.server_error"
