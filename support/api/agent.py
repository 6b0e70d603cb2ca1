"""Agent endpoints: fetch (with the top-up) and move one's own tickets."""

from adrf.views import APIView
from asgiref.sync import sync_to_async
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from support import services
from support.api.auth import IsAgent
from support.api.schema import TransitionRefusedSerializer, answers, body_errors
from support.api.serializers import AgentTransitionSerializer, TicketSerializer, ticket_json


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
        rows = await sync_to_async(services.tickets_top_up)(agent_id=request.user.pk)
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
        serializer = AgentTransitionSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        row = await sync_to_async(services.ticket_transition_by_agent)(
            agent_id=request.user.pk,
            ticket_id=serializer.validated_data["ticket_id"],
            to_status=serializer.validated_data["status"],
        )
        return Response(ticket_json(row))
