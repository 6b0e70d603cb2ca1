"""Agent endpoints: fetch (with the top-up) and move one's own tickets."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from support import services
from support.api.auth import IsAgent
from support.api.schema import TransitionRefusedSerializer, answers, body_errors
from support.api.serializers import AgentTransitionSerializer, TicketSerializer, ticket_json
from support.api.views import APIView


class AgentTicketsView(APIView):
    permission_classes = [IsAgent]

    @extend_schema(
        operation_id="agent_tickets_fetch",
        description=(
            "Tops the caller up to the cap from the pool (highest priority, then oldest), then "
            "lists its tickets in status assigned, by assigned_at then id."
        ),
        responses=answers({200: TicketSerializer(many=True)}, 401, 403),
    )
    async def get(self, request):
        return await self.in_thread(self._fetch, request)

    def _fetch(self, request):
        # The token check just read the caller's role: a full agent needs no lock.
        rows = services.tickets_top_up(agent_id=request.user.pk, role_checked=True)
        return Response([ticket_json(row) for row in rows])

    @extend_schema(
        operation_id="agent_tickets_move",
        description="assigned -> resolved, resolved -> closed, on a ticket the caller holds.",
        request=AgentTransitionSerializer,
        responses={
            **answers({200: TicketSerializer}, 401, 403, 404, *body_errors(), field_errors=True),
            409: OpenApiResponse(
                TransitionRefusedSerializer, description="The state machine forbids this move."
            ),
        },
    )
    async def post(self, request):
        return await self.in_thread(self._move, request)

    def _move(self, request):
        serializer = AgentTransitionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        row = services.ticket_transition_by_agent(
            agent_id=request.user.pk,
            ticket_id=serializer.validated_data["ticket_id"],
            to_status=serializer.validated_data["status"],
        )
        return Response(ticket_json(row))
