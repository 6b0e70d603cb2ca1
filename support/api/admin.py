"""Admin endpoints: tickets and agents. Thin: in one thread hop, validate, call one selector or
service, answer."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.response import Response

from support import services
from support.api import conditional, pagination
from support.api.auth import IsAdmin, IsAgent
from support.api.filters import TicketFilter
from support.api.schema import (
    ERROR_TEXT,
    ID_PATH,
    IDEMPOTENCY_KEY,
    IF_MATCH,
    IF_NONE_MATCH,
    LIST_DESCRIPTION,
    LIST_PARAMETERS,
    PAGINATED_TICKETS,
    REPLAYED,
    answers,
    body_errors,
    etag_header,
    keyed,
)
from support.api.serializers import (
    AgentCreateSerializer,
    AgentSerializer,
    AgentUpdateSerializer,
    TicketCreateSerializer,
    TicketEventSerializer,
    TicketSerializer,
    TicketUpdateSerializer,
    ticket_json,
)
from support.api.views import APIView
from support.models import Ticket


class TicketListView(APIView):
    permission_classes = [IsAdmin]
    idempotency_keys = True

    @extend_schema(
        operation_id="tickets_list",
        description=LIST_DESCRIPTION,
        parameters=LIST_PARAMETERS,
        responses=answers({200: PAGINATED_TICKETS}, 401, 403, 404, field_errors=True),
    )
    async def get(self, request):
        return await self.in_thread(self._list, request)

    def _list(self, request):
        cursor = pagination.cursor_param(request)
        page = pagination.page_number(request) if cursor is None else None
        size = pagination.page_size(request)
        if not any(name in TicketFilter.base_filters for name in request.query_params):
            queryset = None  # no FilterSet to build: the counters' total, a prepared page
            count, exact = services.list_count()
        else:
            filterset = TicketFilter(request.query_params, queryset=Ticket.objects.all())
            if not filterset.is_valid():
                raise exceptions.ValidationError(filterset.errors)
            queryset = filterset.qs
            count, exact = services.list_count(
                queryset, statuses=filterset.statuses(), narrowed=filterset.narrowed()
            )
        if cursor is None:
            links, rows = pagination.numbered_page(request, queryset, page, size, count, exact)
        else:
            links, rows = pagination.cursor_page(request, queryset, cursor, size)
        results = [ticket_json(row) for row in rows]
        return Response({"count": count, "count_exact": exact, **links, "results": results})

    @extend_schema(
        operation_id="tickets_create",
        request=TicketCreateSerializer,
        parameters=[IDEMPOTENCY_KEY, REPLAYED, etag_header(201)],
        responses=keyed(
            answers({201: TicketSerializer}, 401, 403, *body_errors(), field_errors=True)
        ),
    )
    async def post(self, request):
        return await self.in_thread(self._create, request)

    def _create(self, request):
        serializer = TicketCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        row = services.ticket_create(**serializer.validated_data, created_by_id=request.user.pk)
        return conditional.ticket_response(row, status.HTTP_201_CREATED)


# PUT and PATCH of a ticket: the same answers
EDIT_ANSWERS = answers(
    {200: TicketSerializer}, 401, 403, 404, 409, 412, 428, *body_errors(), field_errors=True
)


class TicketDetailView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="tickets_retrieve",
        parameters=[ID_PATH, IF_NONE_MATCH, IF_MATCH, etag_header(200, 304, 412)],
        responses=answers(
            {200: TicketSerializer, 304: OpenApiResponse(description=ERROR_TEXT[304])},
            401,
            403,
            404,
            412,
            field_errors=True,
        ),
    )
    async def get(self, request, pk):
        return await self.in_thread(self._retrieve, request, pk)

    def _retrieve(self, request, pk):
        row = services.ticket_row(pk)
        return conditional.not_modified(request, row) or conditional.ticket_response(row)

    @extend_schema(
        operation_id="tickets_update",
        parameters=[ID_PATH, IF_MATCH, IF_NONE_MATCH, etag_header(200, 412)],
        request=TicketUpdateSerializer,
        responses=EDIT_ANSWERS,
    )
    async def put(self, request, pk):
        return await self.in_thread(self._update, request, pk, partial=False)

    @extend_schema(
        operation_id="tickets_partial_update",
        parameters=[ID_PATH, IF_MATCH, IF_NONE_MATCH, etag_header(200, 412)],
        request=TicketUpdateSerializer(partial=True),
        responses=EDIT_ANSWERS,
    )
    async def patch(self, request, pk):
        return await self.in_thread(self._update, request, pk, partial=True)

    def _update(self, request, pk, *, partial):
        versions = conditional.admin_write_preconditions(request, pk)
        # The ticket first, as DRF's generic views do: an unknown one is 404, a stale If-Match
        # 412, whatever the body. The edit starts from this read, so a valid edit costs no
        # extra statement; its version is compared again under the edit's locks.
        holder, version = services.ticket_head(pk)
        services.check_version(pk, version, versions)
        serializer = TicketUpdateSerializer(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        row = services.ticket_update(
            ticket_id=pk,
            changes=serializer.validated_data,
            actor_id=request.user.pk,
            holder=holder,
            versions=versions,
        )
        return conditional.ticket_response(row)

    @extend_schema(
        operation_id="tickets_destroy",
        parameters=[ID_PATH, IF_MATCH, IF_NONE_MATCH, etag_header(412)],
        responses=answers({204: None}, 401, 403, 404, 409, 412, 428, field_errors=True),
    )
    async def delete(self, request, pk):
        return await self.in_thread(self._delete, request, pk)

    def _delete(self, request, pk):
        versions = conditional.admin_write_preconditions(request, pk)
        services.ticket_delete(ticket_id=pk, actor_id=request.user.pk, versions=versions)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TicketHistoryView(APIView):
    """Admins: any ticket's history (a deleted ticket's too). Agents: a ticket they hold."""

    permission_classes = [IsAdmin | IsAgent]

    @extend_schema(
        operation_id="tickets_history",
        parameters=[ID_PATH],
        responses=answers({200: TicketEventSerializer(many=True)}, 401, 403, 404),
    )
    async def get(self, request, pk):
        return await self.in_thread(self._history, request, pk)

    def _history(self, request, pk):
        if not request.user.is_staff and not services.agent_holds(
            ticket_id=pk, agent_id=request.user.pk
        ):
            raise exceptions.NotFound(services.NOT_YOURS)
        serializer = TicketEventSerializer()
        events = [serializer.to_representation(row) for row in services.ticket_history(pk)]
        if not events and not Ticket.objects.filter(pk=pk).exists():
            raise exceptions.NotFound("No Ticket matches the given query.")
        return Response(events)


class AgentListView(APIView):
    permission_classes = [IsAdmin]
    idempotency_keys = True

    @extend_schema(
        operation_id="agents_list", responses=answers({200: AgentSerializer(many=True)}, 401, 403)
    )
    async def get(self, request):
        return await self.in_thread(lambda: Response(list(services.agents_with_load())))

    @extend_schema(
        operation_id="agents_create",
        request=AgentCreateSerializer,
        parameters=[IDEMPOTENCY_KEY, REPLAYED],
        responses=keyed(
            answers({201: AgentSerializer}, 401, 403, *body_errors(), field_errors=True)
        ),
    )
    async def post(self, request):
        return await self.in_thread(self._create, request)

    def _create(self, request):
        serializer = AgentCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = services.agent_create(**serializer.validated_data)
        data = {
            "id": user.pk,
            "username": user.username,
            "email": user.email,
            "is_active": user.is_active,
            "assigned_count": 0,
        }
        return Response(AgentSerializer(data).data, status=status.HTTP_201_CREATED)


class AgentDetailView(APIView):
    permission_classes = [IsAdmin]

    @extend_schema(
        operation_id="agents_retrieve",
        parameters=[ID_PATH],
        responses=answers({200: AgentSerializer}, 401, 403, 404),
    )
    async def get(self, request, pk):
        return await self.in_thread(lambda: Response(services.agent_row(pk)))

    @extend_schema(
        operation_id="agents_partial_update",
        description=(
            '{"is_active": true} reactivates a deactivated agent (it logs in again; it holds '
            'nothing); {"is_active": false} deactivates it, as DELETE does.'
        ),
        parameters=[ID_PATH],
        request=AgentUpdateSerializer(partial=True),
        responses=answers({200: AgentSerializer}, 401, 403, 404, *body_errors(), field_errors=True),
    )
    async def patch(self, request, pk):
        return await self.in_thread(self._update, request, pk)

    def _update(self, request, pk):
        services.agent_row(pk)  # the agent first: an unknown one is 404 whatever the body
        serializer = AgentUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        active = serializer.validated_data.get("is_active")
        if active is True:
            services.agent_reactivate(agent_id=pk)
        elif active is False:
            services.agent_deactivate(agent_id=pk, actor_id=request.user.pk)
        return Response(services.agent_row(pk))

    @extend_schema(
        operation_id="agents_deactivate",
        description="Deactivates the agent (kept, not erased); its tickets go back to the pool.",
        parameters=[ID_PATH],
        responses=answers({204: None}, 401, 403, 404),
    )
    async def delete(self, request, pk):
        return await self.in_thread(self._deactivate, request, pk)

    def _deactivate(self, request, pk):
        services.agent_deactivate(agent_id=pk, actor_id=request.user.pk)
        return Response(status=status.HTTP_204_NO_CONTENT)
