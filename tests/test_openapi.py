"""The OpenAPI schema: valid, complete (every API route and method), and served with docs pages
that load nothing from outside the app."""

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
import yaml
from django.core.management import call_command
from django.urls import URLPattern, URLResolver, get_resolver
from openapi_spec_validator import validate

from tests.conftest import CHROMIUM, CHROMIUM_ARGS, TICKET_KEYS
from tests.servers import run_uvicorn

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


KEYED = {"409", "422"}  # Idempotency-Key: the first still running; another request


@pytest.mark.parametrize(
    ("path", "method", "codes"),
    [
        ("/api/auth/token/", "post", {"200", "400", "413", "415", "429", "503"}),
        ("/api/auth/logout/", "post", {"204", "400", "401", "429", "503"} | KEYED),
        ("/api/tickets/", "get", {"200", "400", "401", "403", "404", "429", "503"}),
        (
            "/api/tickets/",
            "post",
            {"201", "400", "401", "403", "413", "415", "429", "503"} | KEYED,
        ),
        (
            "/api/tickets/{id}/",
            "get",
            {"200", "304", "400", "401", "403", "404", "412", "429", "503"},
        ),
        (
            "/api/tickets/{id}/",
            "patch",
            {"200", "400", "401", "403", "404", "409", "412", "413", "415", "428", "429", "503"},
        ),
        (
            "/api/tickets/{id}/",
            "put",
            {"200", "400", "401", "403", "404", "409", "412", "413", "415", "428", "429", "503"},
        ),
        (
            "/api/tickets/{id}/",
            "delete",
            {"204", "400", "401", "403", "404", "409", "412", "428", "429", "503"},
        ),
        ("/api/tickets/{id}/history/", "get", {"200", "401", "403", "404", "429", "503"}),
        (
            "/api/agents/",
            "post",
            {"201", "400", "401", "403", "413", "415", "429", "503"} | KEYED,
        ),
        ("/api/agents/{id}/", "get", {"200", "401", "403", "404", "429", "503"}),
        (
            "/api/agents/{id}/",
            "patch",
            {"200", "400", "401", "403", "404", "413", "415", "429", "503"},
        ),
        ("/api/agents/{id}/", "delete", {"204", "401", "403", "404", "429", "503"}),
        ("/api/agent/tickets/", "get", {"200", "400", "401", "403", "429", "503"}),
        ("/api/events/", "get", {"200", "400", "401", "403", "429", "503"}),
        (
            "/api/agent/tickets/",
            "post",
            {"200", "400", "401", "403", "404", "409", "412", "413", "415", "429", "503"} | KEYED,
        ),
        (
            "/api/agent/tickets/{id}/release/",
            "post",
            {"200", "400", "401", "403", "404", "409", "412", "429", "503"} | KEYED,
        ),
    ],
)
def test_each_operation_lists_the_answers_it_really_gives(schema, path, method, codes):
    assert set(schema["paths"][path][method]["responses"]) == codes


def _headers_in(operation) -> set[str]:
    return {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}


def test_safe_retry_and_edit_headers_are_documented(schema):
    """Every POST that changes something takes Idempotency-Key; every ticket write If-Match,
    the ticket's GET If-None-Match; ticket answers and 412s say their ETag."""
    paths = schema["paths"]
    keyed_posts = [
        "/api/tickets/",
        "/api/agents/",
        "/api/agent/tickets/",
        "/api/agent/tickets/{id}/release/",
        "/api/auth/logout/",
    ]
    posts = [path for path, ops in paths.items() if "post" in ops]
    assert sorted(keyed_posts) == sorted(p for p in posts if p != "/api/auth/token/")
    for path in keyed_posts:
        operation = paths[path]["post"]
        assert "Idempotency-Key" in _headers_in(operation), path
        assert "Idempotent-Replayed" in operation["responses"]["422"]["headers"], path
    conditional = [
        ("/api/tickets/{id}/", "put", "200"),
        ("/api/tickets/{id}/", "patch", "200"),
        ("/api/tickets/{id}/", "delete", None),
        ("/api/agent/tickets/", "post", "200"),
        ("/api/agent/tickets/{id}/release/", "post", "200"),
    ]
    for path, method, ok in conditional:
        operation = paths[path][method]
        assert "If-Match" in _headers_in(operation), (path, method)
        assert "ETag" in operation["responses"]["412"]["headers"], (path, method)
        if ok:
            assert "ETag" in operation["responses"][ok]["headers"], (path, method)
    detail = paths["/api/tickets/{id}/"]["get"]
    assert "If-None-Match" in _headers_in(detail)
    assert "ETag" in detail["responses"]["304"]["headers"]
    assert "content" not in detail["responses"]["304"]
    assert "ETag" in paths["/api/tickets/"]["post"]["responses"]["201"]["headers"]


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
        "cursor",
        "page_size",
        "status",
        "priority",
        "assigned_to",
        "search",
        "ordering",
    }
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    page = schemas[page.rsplit("/", 1)[1]]
    assert list(page["properties"]) == ["count", "count_exact", "next", "previous", "results"]
    assert page["properties"]["count_exact"]["type"] == "boolean"
    assert "400" in listing["responses"]
    assert "cursor" in listing["description"]


# --- The docs pages load nothing from outside the app -----------------------------------------
# Two layers. Statically: the pages' markup and every stylesheet they load reference only the
# app, and the URLs the loaded scripts hard-code as something to fetch are refused by the pages'
# Content-Security-Policy (ReDoc's bundle adds a logo from cdn.redoc.ly). In a real browser:
# every request either goes to the app or is one the policy stopped before it was sent.
DOC_PAGES = ["/api/docs/", "/api/redoc/"]
# What a page's policy may allow: nothing named by host or scheme, so nothing from elsewhere.
LOCAL_SOURCES = {"'self'", "'none'", "'unsafe-inline'", "data:", "blob:"}
FETCH_DIRECTIVES = (
    "default-src",
    "script-src",
    "style-src",
    "img-src",
    "font-src",
    "connect-src",
    "media-src",
    "object-src",
    "frame-src",
    "worker-src",
    "manifest-src",
)
CSS_URL = re.compile(r"""(?<![\w.$])url\(\s*(?:"([^"]*)"|'([^']*)'|([^)\s]*))\s*\)""")
CSS_IMPORT = re.compile(r"""@import\s+(?:"([^"]*)"|'([^']*)')""")  # @import url() is a url()
CSS_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_ABSOLUTE = r"""["'`]((?:https?:)?//[^"'`\s]+)"""
# What a script fetches by itself from a literal URL: an element's src (img, script, iframe), or
# fetch / XMLHttpRequest / workers / dynamic import. Other URL strings in a bundle (licences,
# links, JSON Schema ids, XML namespaces) are never requested.
SCRIPT_LOADS = re.compile(
    r"\bsrc(?:set)?\s*[:=]\s*" + _ABSOLUTE
    + r"|\b(?:fetch|importScripts|Worker|SharedWorker|EventSource|sendBeacon|import)\s*\(\s*"
    + _ABSOLUTE
    + r"""|\.open\(\s*["'][A-Za-z]+["']\s*,\s*"""
    + _ABSOLUTE
)  # fmt: skip


class _PageParts(HTMLParser):
    """What a browser fetches for a page's markup: (tag, url) for each <link>, <script>, <img>
    and the like; the CSS of its <style> elements and style attributes; its inline scripts; and
    its Content-Security-Policy <meta> as {directive: [sources]}."""

    SOURCES = {"script": "src", "img": "src", "iframe": "src", "embed": "src", "source": "src"}
    SOURCES |= {"audio": "src", "video": "src", "input": "src", "object": "data"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []
        self.css: list[str] = []
        self.scripts: list[str] = []
        self.policy: dict[str, list[str]] | None = None
        self._inside: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in attrs}
        if attrs.get("style"):
            self.css.append(attrs["style"])
        if tag == "link" and attrs.get("href"):  # stylesheet, icon, preconnect, preload...
            self.refs.append((f"link rel={attrs.get('rel', '')}", attrs["href"]))
        elif tag in self.SOURCES and attrs.get(self.SOURCES[tag]):
            self.refs.append((tag, attrs[self.SOURCES[tag]]))
        for candidate in attrs.get("srcset", "").split(","):
            if candidate.strip():
                self.refs.append((f"{tag} srcset", candidate.split()[0]))
        if tag == "meta" and attrs.get("http-equiv", "").lower() == "content-security-policy":
            self.policy = {
                name: sources
                for name, *sources in (d.split() for d in attrs["content"].split(";") if d.strip())
            }
        if tag in ("style", "script") and not attrs.get("src"):
            self._inside = tag

    def handle_endtag(self, tag):
        self._inside = None

    def handle_data(self, data):
        if self._inside == "style":
            self.css.append(data)
        elif self._inside == "script":
            self.scripts.append(data)


def _css_refs(css: str) -> list[str]:
    css = CSS_COMMENT.sub("", css)
    found = [*CSS_URL.finditer(css), *CSS_IMPORT.finditer(css)]
    return [next(g for g in m.groups() if g is not None) for m in found]


def _script_loads(script: str) -> list[str]:
    """Absolute URLs a script fetches by itself: SCRIPT_LOADS, and url()/@import in CSS it
    injects."""
    urls = [next(g for g in m.groups() if g) for m in SCRIPT_LOADS.finditer(script)]
    return urls + [url for url in _css_refs(script) if not _is_local(url)]


def _is_local(url: str) -> bool:
    """A path on the app itself, or inline data; not an absolute or protocol-relative URL."""
    parts = urlsplit(url.strip())
    return parts.scheme in ("data", "blob") or not (parts.scheme or parts.netloc)


def _policy_lets_in(policy: dict[str, list[str]] | None, url: str) -> bool:
    """Whether some fetch directive of the page's policy allows loading ``url`` (absolute, not
    the app's): a wildcard, its scheme, or its host."""
    if policy is None:
        return True
    parts = urlsplit(url if urlsplit(url).scheme else "https:" + url)
    for directive in FETCH_DIRECTIVES:
        for source in policy.get(directive, policy.get("default-src", ["*"])):
            if source.startswith("'"):
                continue  # 'self' is the app; the other keywords name no place
            if source == "*" or source in (f"{parts.scheme}:", "http:"):
                return True
            host = re.sub(r"^[a-z]+://", "", source).split("/")[0].split(":")[0]
            if re.fullmatch(re.escape(host).replace(r"\*", ".+"), parts.hostname or ""):
                return True
    return False


@pytest.mark.smoke
@pytest.mark.parametrize("page", DOC_PAGES)
async def test_docs_pages_and_their_assets_reference_only_the_app(make_client, page):
    client = make_client()
    r = await client.get(page)
    assert r.status_code == 200
    parts = _PageParts()
    parts.feed(r.text)
    outside = parts.refs + [("inline css", url) for css in parts.css for url in _css_refs(css)]
    outside = [(where, url) for where, url in outside if not _is_local(url)]
    script_loads = [("inline script", url) for s in parts.scripts for url in _script_loads(s)]

    # Follow what the page loads from the app (scripts, stylesheets, images, and what the
    # stylesheets load in turn): each is served, and is scanned by its kind.
    queue = [urljoin(page, url) for _, url in parts.refs if not url.startswith(("data:", "blob:"))]
    queue = [url for url in queue if _is_local(url)]
    assert any("/static/drf_spectacular_sidecar/" in url for url in queue)
    seen = set()
    while queue:
        asset = queue.pop()
        if asset in seen:
            continue
        seen.add(asset)
        served = await client.get(asset)
        assert served.status_code == 200, asset
        kind = served.headers.get("content-type", "")
        if "css" in kind:
            for url in _css_refs(served.text):
                if not _is_local(url):
                    outside.append((asset, url))
                elif not url.startswith(("data:", "blob:")):
                    queue.append(urljoin(asset, url))
        elif "javascript" in kind:
            script_loads += [(asset, url) for url in _script_loads(served.text)]

    assert outside == [], "the page's markup or stylesheets load from outside the app"
    let_in = [(where, url) for where, url in script_loads if _policy_lets_in(parts.policy, url)]
    assert let_in == [], "scripts load from outside the app and the page's policy allows it"
    # The policy itself lets in nothing from elsewhere (whatever a script may try).
    assert parts.policy is not None, "the page sets no Content-Security-Policy"
    assert "default-src" in parts.policy
    for directive, sources in parts.policy.items():
        assert set(sources) <= LOCAL_SOURCES, f"{directive} lets in {sources}"


# The pages are opened under a name other than localhost/127.0.0.1, as in production (Swagger
# UI, for one, behaves differently on a loopback name). Every other name fails to resolve: the
# test never reaches the Internet.
DOCS_HOST = "docs.test"
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push({uri: e.blockedURI, directive: e.effectiveDirective});
});
"""


def _open_recorded(browser, url: str, origin: str):
    """Open ``url`` in a fresh context, recording every request the page tries (``tried``) and
    every one that reached the network for somewhere other than ``origin`` (``sent_out``, which
    are aborted)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    tried: list[str] = []
    sent_out: list[str] = []

    def route(route):
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            sent_out.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(10_000)
    page.add_init_script(RECORD_VIOLATIONS)
    page.on("request", lambda request: tried.append(request.url))
    page.goto(url, wait_until="networkidle", timeout=15_000)
    return page, tried, sent_out


def test_docs_pages_in_a_real_browser_request_only_the_app(schema):
    from playwright.sync_api import expect, sync_playwright

    title = schema["info"]["title"]
    operations = [(path, method) for path, ops in schema["paths"].items() for method in ops]
    args = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {DOCS_HOST} 127.0.0.1, MAP * ~NOTFOUND"]
    with (
        run_uvicorn(workers=1, env={"DJANGO_ALLOWED_HOSTS": DOCS_HOST}) as server,
        sync_playwright() as playwright,
    ):
        origin = f"http://{DOCS_HOST}:{server.port}"
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args, timeout=30_000)
        try:
            for path in DOC_PAGES:
                page, tried, sent_out = _open_recorded(browser, origin + path, origin)
                # The page rendered the API from the schema.
                if path == "/api/redoc/":
                    expect(page.locator("h1").first).to_contain_text(title)
                    for operation in schema["paths"]["/api/tickets/"].values():
                        expect(page.get_by_text(operation["operationId"])).not_to_have_count(0)
                else:
                    expect(page.locator(".opblock")).to_have_count(len(operations))
                    shown = page.locator(".opblock-summary-path").all_inner_texts()
                    assert {p.replace("\u200b", "") for p in shown} == set(schema["paths"])
                page.wait_for_load_state("networkidle")
                violations = page.evaluate("window.__violations")
                page.context.close()

                assert sent_out == [], f"{path} sent requests outside the app"
                assert any(url.startswith(f"{origin}/static/") for url in tried), tried
                elsewhere = {
                    url for url in tried if not url.startswith((origin + "/", "data:", "blob:"))
                }
                # Only the page's policy kept these from being sent (ReDoc's logo), and the
                # policy blocked nothing the page needs (no inline script or eval refused).
                blocked = {v["uri"] for v in violations}
                assert elsewhere <= blocked, f"{path} tried {elsewhere - blocked}"
                assert all(not _is_local(uri) for uri in blocked), violations
        finally:
            browser.close()
