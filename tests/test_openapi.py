"""The OpenAPI schema: valid, complete (every API route and method), and served with its docs
from local assets."""

import re

import pytest
import yaml
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver
from openapi_spec_validator import validate

from tests.conftest import TICKET_KEYS

pytestmark = pytest.mark.django_db(transaction=True)

DOC_ROUTES = {"schema", "swagger-ui", "redoc"}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


def _api_routes(resolver=None, prefix=""):
    """(path template, view class) for every route under /api/, from the URL configuration."""
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _api_routes(entry, route)
        elif isinstance(entry, URLPattern) and route.startswith("api/"):
            if entry.name in DOC_ROUTES:
                continue
            template = "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route).replace("{pk}", "{id}")
            yield template, entry.callback.cls


@pytest.fixture(scope="module")
def schema():
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


def test_schema_generates_without_warnings_and_validates(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    validate(yaml.safe_load(out.read_text()))


@pytest.mark.smoke
async def test_served_schema_is_valid_openapi_3_in_yaml_and_json(make_client):
    client = make_client()
    as_yaml = await client.get("/api/schema/")
    assert as_yaml.status_code == 200
    as_json = await client.get("/api/schema/?format=json")
    assert as_json.status_code == 200
    document = as_json.json()
    assert document == yaml.safe_load(as_yaml.text)
    assert document["openapi"].startswith("3.")
    validate(document)


def test_every_api_route_and_method_is_in_the_schema(schema):
    routes = list(_api_routes())
    assert len(routes) >= 7
    for template, view in routes:
        assert template in schema["paths"], f"{template} is missing from the schema"
        implemented = {m for m in HTTP_METHODS if hasattr(view, m)}
        assert set(schema["paths"][template]) == implemented, template


def test_status_and_priority_are_enums_and_tokens_are_the_security_scheme(schema):
    components = schema["components"]
    assert components["schemas"]["TicketStatusEnum"]["enum"] == [
        "open",
        "assigned",
        "resolved",
        "closed",
    ]
    assert components["schemas"]["TicketPriorityEnum"]["enum"] == [
        "low",
        "normal",
        "high",
        "urgent",
    ]
    token = components["securitySchemes"]["tokenAuth"]
    assert (token["type"], token["in"], token["name"]) == ("apiKey", "header", "Authorization")
    fetch = schema["paths"]["/api/agent/tickets/"]["get"]
    assert {"tokenAuth": []} in fetch["security"]
    login = schema["paths"]["/api/auth/token/"]["post"]
    assert login.get("security") in (None, [], [{}])


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        ("/api/auth/token/", "post", {"200", "400", "413", "415", "429", "503"}),
        ("/api/auth/logout/", "post", {"204", "401", "429", "503"}),
        ("/api/tickets/", "get", {"200", "400", "401", "403", "404", "429", "503"}),
        ("/api/tickets/", "post", {"201", "400", "401", "403", "413", "415", "429", "503"}),
        ("/api/tickets/{id}/", "get", {"200", "401", "403", "404", "429", "503"}),
        (
            "/api/tickets/{id}/",
            "patch",
            {"200", "400", "401", "403", "404", "409", "413", "415", "429", "503"},
        ),
        ("/api/tickets/{id}/", "delete", {"204", "401", "403", "404", "409", "429", "503"}),
        ("/api/tickets/{id}/history/", "get", {"200", "401", "403", "404", "429", "503"}),
        ("/api/agents/", "post", {"201", "400", "401", "403", "413", "415", "429", "503"}),
        ("/api/agents/{id}/", "delete", {"204", "401", "403", "404", "429", "503"}),
        ("/api/agent/tickets/", "get", {"200", "401", "403", "429", "503"}),
        (
            "/api/agent/tickets/",
            "post",
            {"200", "400", "401", "403", "404", "409", "413", "415", "429", "503"},
        ),
    ],
)
def test_each_operation_lists_the_answers_it_really_gives(schema, path, method, codes):
    assert set(schema["paths"][path][method]["responses"]) == codes


def test_bodies_and_answers_have_their_shapes(schema):
    schemas = schema["components"]["schemas"]
    ticket = schemas["Ticket"]["properties"]
    assert set(ticket) == TICKET_KEYS
    move = schema["paths"]["/api/agent/tickets/"]["post"]
    refused = move["responses"]["409"]["content"]["application/json"]["schema"]["$ref"]
    assert set(schemas[refused.rsplit("/", 1)[1]]["properties"]) == {
        "detail",
        "current_status",
        "allowed",
    }
    request = move["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert set(schemas[request.rsplit("/", 1)[1]]["required"]) == {"ticket_id", "status"}
    listing = schema["paths"]["/api/tickets/"]["get"]
    params = {p["name"] for p in listing["parameters"]}
    assert params == {
        "page",
        "page_size",
        "status",
        "priority",
        "assigned_to",
        "search",
        "ordering",
    }


@pytest.mark.smoke
@pytest.mark.parametrize("page", ["/api/docs/", "/api/redoc/"])
async def test_docs_pages_use_local_assets_only(make_client, page):
    client = make_client()
    r = await client.get(page)
    assert r.status_code == 200
    html = r.text
    assert "/static/drf_spectacular_sidecar/" in html
    assert "cdn" not in html.lower()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert assets
    for asset in assets:
        served = await client.get(asset)
        assert served.status_code == 200, asset
