from django.urls import path, register_converter

from support.api import admin, agent, events, login


class IdConverter:
    """A database id: digits only, short enough for a 64-bit integer (longer ones are 404)."""

    regex = "[0-9]{1,18}"

    def to_python(self, value):
        return int(value)

    def to_url(self, value):
        return str(value)


register_converter(IdConverter, "id")

urlpatterns = [
    path("auth/token/", login.ObtainTokenView.as_view(), name="auth-token"),
    path("auth/logout/", login.LogoutView.as_view(), name="auth-logout"),
    path("tickets/", admin.TicketListView.as_view(), name="ticket-list"),
    path("tickets/<id:pk>/", admin.TicketDetailView.as_view(), name="ticket-detail"),
    path("tickets/<id:pk>/history/", admin.TicketHistoryView.as_view(), name="ticket-history"),
    path("agents/", admin.AgentListView.as_view(), name="agent-list"),
    path("agents/<id:pk>/", admin.AgentDetailView.as_view(), name="agent-detail"),
    path("agent/tickets/", agent.AgentTicketsView.as_view(), name="agent-tickets"),
    path(
        "agent/tickets/<id:pk>/release/",
        agent.AgentTicketReleaseView.as_view(),
        name="agent-ticket-release",
    ),
    path("events/", events.EventFeedView.as_view(), name="event-feed"),
]
