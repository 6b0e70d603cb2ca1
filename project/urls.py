from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("support.api.urls")),
    path("api-auth/", include("rest_framework.urls")),
]

handler400 = "support.api.views_errors.bad_request"
handler404 = "support.api.views_errors.not_found"
handler500 = "support.api.views_errors.server_error"
