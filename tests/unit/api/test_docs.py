"""/docs and /redoc: every asset from this server, under the request's root path, never from a CDN."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine

PAGES = ["/docs", "/redoc"]
# What the page's HTML points at: stylesheets, scripts, the favicon, the schema.
REFERENCE = re.compile(r"""(?:src|href|spec-url)="([^"]*)"|url: '([^']*)'""")
ASSETS = [
    ("swagger-ui-bundle.js", "text/javascript", b"SwaggerUIBundle"),
    ("swagger-ui.css", "text/css", b".swagger-ui"),
    ("redoc.standalone.js", "text/javascript", b"Redoc"),
    ("favicon.png", "image/png", b"\x89PNG"),
]


def references(html: str) -> list[str]:
    return [first or second for first, second in REFERENCE.findall(html)]


@pytest.fixture
def staged(served_engine: Engine) -> TestClient:
    """The app behind a REST API stage: its root path is /prod."""
    return TestClient(create_app(served_engine.settings, served_engine), root_path="/prod")


@pytest.mark.parametrize("page", PAGES)
def test_pages_load_nothing_from_other_hosts(client: TestClient, page: str) -> None:
    # WHEN the page is fetched
    response = client.get(page)

    # THEN it points only at paths of this server, and every one of them answers
    assert response.status_code == 200
    html = response.text
    assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
    urls = references(html)
    assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    for url in urls:
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize(("name", "content_type", "start"), ASSETS)
def test_assets_are_served_from_the_package(
    client: TestClient, name: str, content_type: str, start: bytes
) -> None:
    response = client.get(f"/docs/assets/{name}")

    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == content_type
    assert start in response.content


def test_an_unknown_asset_is_the_one_404(client: TestClient) -> None:
    for path in ("/docs/assets/nope.js", "/docs/assets/..%2Fdocs.py", "/docs/assets/"):
        response = client.get(path)

        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("page", PAGES)
def test_behind_a_stage_every_url_carries_the_root_path(staged: TestClient, page: str) -> None:
    # WHEN the page is fetched behind the /prod stage
    urls = references(staged.get(page).text)

    # THEN the schema and every asset are asked for under /prod, and answer there
    assert "/prod/openapi.json" in urls
    assert all(url.startswith("/prod/") for url in urls), urls
    for url in urls:
        assert staged.get(url).status_code == 200, url


def test_assets_are_found_when_the_stage_is_not_in_the_request_path(staged: TestClient) -> None:
    # GIVEN a request path without the root path, as API Gateway's REST events arrive through Mangum
    response = staged.get("/docs/assets/swagger-ui.css")

    # THEN the asset is still served
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/css")


def test_the_oauth2_redirect_page_is_kept(client: TestClient) -> None:
    assert client.get("/docs/oauth2-redirect").status_code == 200
