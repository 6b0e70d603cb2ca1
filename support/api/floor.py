"""The framework floor for the benchmark: an async view that touches no database.

Routed at ``/bench/floor/`` only when ``SUPPORT_BENCH_ENDPOINTS`` is on (the benchmark's server);
it measures what Django, DRF and adrf cost per request (with the one thread hop every API
request makes) before any work of the service.
"""

from drf_spectacular.utils import extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from support.api.views import APIView


class FloorView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []

    @extend_schema(exclude=True)
    async def get(self, request):
        return await self.in_thread(lambda: Response({"ok": True}))
