"""JSON answers for errors Django raises outside the API views (unknown paths, bad hosts)."""

from django.http import JsonResponse


def bad_request(request, exception=None):
    return JsonResponse({"detail": "Bad request."}, status=400)


def not_found(request, exception=None):
    return JsonResponse({"detail": "Not found."}, status=404)


def server_error(request):
    return JsonResponse({"detail": "Internal server error."}, status=500)
