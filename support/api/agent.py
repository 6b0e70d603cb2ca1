"""Agent endpoints: fetch (with the top-up and the wait for work), move one's own tickets, hand
one back."""

import asyncio

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.response import Response

from project.handler import release_request_thread
from support import live, services
from support.api import conditional
from support.api.auth import IsAgent
from support.api.schema import (
    ID_PATH,
    IDEMPOTENCY_KEY,
    IF_MATCH,
    IF_NONE_MATCH,
    KEY_IN_USE,
    REPLAYED,
    TransitionRefusedSerializer,
    answers,
    body_errors,
    etag_header,
    keyed,
)
from support.api.serializers import (
    AgentFetchQuerySerializer,
    AgentTransitionSerializer,
    TicketSerializer,
    ticket_json,
)
from support.api.views import APIView


class AgentTicketsView(APIView):
    permission_classes = [IsAgent]
    idempotency_keys = True

    @extend_schema(
        operation_id="agent_tickets_fetch",
        description=(
            "Tops the caller up to the cap from the pool (highest priority, then oldest), then "
            "lists its tickets in status assigned, by assigned_at then id. With `wait=N`, a "
            "caller left holding nothing waits up to N seconds for tickets to enter the pool, "
            "then tops up and answers; at the deadline it answers the empty list."
        ),
        parameters=[
            OpenApiParameter(
                "wait",
                float,
                description=(
                    "Seconds (0 < N <= 60, up to 3 decimals) to wait for work when the top-up "
                    "leaves the caller holding nothing. Longest waiter first within a worker."
                ),
            )
        ],
        responses=answers({200: TicketSerializer(many=True)}, 401, 403, field_errors=True),
    )
    async def get(self, request):
        if "wait" not in request.query_params:
            return await self.in_thread(self._fetch, request)
        # Joined before the first look at the pool: tickets entering it meanwhile are not
        # missed (support.live). Waiting holds no thread, and each hop gives its connection
        # back when it ends.
        pool = live.pool()
        waiter = pool.join()
        try:
            deadline = asyncio.get_running_loop().time()
            response = await self.in_thread(self._fetch_waiting, request)
            deadline += self._wait
            while not response.data:
                release_request_thread()
                if not await pool.wait(waiter, deadline):
                    break
                response = await self.then_in_thread(self._fetch, request)
            return response
        finally:
            pool.leave(waiter)

    def _fetch_waiting(self, request):
        query = AgentFetchQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        self._wait = float(query.validated_data["wait"])
        return self._fetch(request)

    def _fetch(self, request):
        # The token check just read the caller's role: a full agent needs no lock.
        rows = services.tickets_top_up(agent_id=request.user.pk, role_checked=True)
        return Response([ticket_json(row) for row in rows])

    @extend_schema(
        operation_id="agent_tickets_move",
        description=(
            "assigned -> resolved, resolved -> closed, on a ticket the caller holds. Judged in "
            "this order: ticket_id well-formed (else 400), the caller's ticket (else 404), "
            "status one of the two (else 400), a move the state machine allows (else 409)."
        ),
        request=AgentTransitionSerializer,
        parameters=[IDEMPOTENCY_KEY, IF_MATCH, IF_NONE_MATCH, REPLAYED, etag_header(200, 412)],
        responses=keyed(
            {
                **answers(
                    {200: TicketSerializer}, 401, 403, 404, 412, *body_errors(), field_errors=True
                ),
                409: OpenApiResponse(
                    TransitionRefusedSerializer,
                    description=f"The state machine forbids this move. Or: {KEY_IN_USE}",
                ),
            }
        ),
    )
    async def post(self, request):
        return await self.in_thread(self._move, request)

    def _move(self, request):
        serializer = AgentTransitionSerializer(data=request.data)
        if not serializer.is_valid():
            # The ticket is judged before the rest of the body, as a path id would be: a
            # well-formed ticket_id that is not one of the caller's tickets is 404. Only a
            # refused body pays for this read; a valid move is checked under its locks.
            ticket_id = serializer.well_formed_ticket_id()
            if ticket_id is not None and not services.agent_holds(
                agent_id=request.user.pk, ticket_id=ticket_id
            ):
                raise exceptions.NotFound(services.NOT_YOURS)
            raise exceptions.ValidationError(serializer.errors)
        ticket_id = serializer.validated_data["ticket_id"]
        row = services.ticket_transition_by_agent(
            agent_id=request.user.pk,
            ticket_id=ticket_id,
            to_status=serializer.validated_data["status"],
            versions=conditional.write_preconditions(request, ticket_id),
        )
        return conditional.ticket_response(row)


class AgentTicketReleaseView(APIView):
    permission_classes = [IsAgent]
    idempotency_keys = True

    @extend_schema(
        operation_id="agent_tickets_release",
        description=(
            "Hands a ticket the caller holds in status assigned back to the pool: it becomes "
            "open, without an agent, with a `released` event whose changes carry "
            '`"reason": "released_by_agent"`. Answers the ticket as the pool now has it. '
            "No body. 404 when the ticket does not exist or is not the caller's (as for a move); "
            "409 when the caller holds it in another status (resolved and closed tickets stay "
            "with the agent who worked them)."
        ),
        request=None,
        parameters=[
            ID_PATH,
            IDEMPOTENCY_KEY,
            IF_MATCH,
            IF_NONE_MATCH,
            REPLAYED,
            etag_header(200, 412),
        ],
        responses=keyed(
            {
                **answers({200: TicketSerializer}, 401, 403, 404, 412, field_errors=True),
                409: OpenApiResponse(
                    TransitionRefusedSerializer,
                    description=(
                        "The ticket is not in status assigned; `allowed` is empty. "
                        f"Or: {KEY_IN_USE}"
                    ),
                ),
            }
        ),
    )
    async def post(self, request, pk):
        return await self.in_thread(self._release, request, pk)

    def _release(self, request, pk):
        versions = conditional.write_preconditions(request, pk)
        row = services.ticket_release_by_agent(
            agent_id=request.user.pk, ticket_id=pk, versions=versions
        )
        return conditional.ticket_response(row)
