"""Agent endpoints: fetch (with the top-up) and move one's own tickets."""

from adrf.views import APIView
from asgiref.sync import sync_to_async
from rest_framework.response import Response

from support import services
from support.api.auth import IsAgent
from support.api.serializers import AgentTransitionSerializer, ticket_json


class AgentTicketsView(APIView):
    permission_classes = [IsAgent]

    async def get(self, request):
        rows = await sync_to_async(services.tickets_top_up)(agent_id=request.user.pk)
        return Response([ticket_json(row) for row in rows])

    async def post(self, request):
        serializer = AgentTransitionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        row = await sync_to_async(services.ticket_transition_by_agent)(
            agent_id=request.user.pk,
            ticket_id=serializer.validated_data["ticket_id"],
            to_status=serializer.validated_data["status"],
        )
        return Response(ticket_json(row))
