"""/docs (Swagger UI) and /redoc from assets shipped in a package, never a CDN.

FastAPI's own pages load their JavaScript, CSS, favicon and fonts from other hosts, so they are blank
on a host without internet. `fastapi-offline` ships the same files; these routes are FastAPI's
documented self-hosting recipe over them, with every URL under the request's root path (a REST API
stage such as `/prod`).

The assets are a route over a fixed list, not a `StaticFiles` mount: a mount finds nothing when the
root path is not part of the request path (as Mangum's events arrive behind a stage), a route does.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS_DIR = Path(str(files("fastapi_offline").joinpath("static")))
# Named here rather than guessed from /etc/mime.types, which differs between hosts.
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


def root_path(request: Request) -> str:
    """The prefix the browser sees before the app's paths: "" on a server, "/prod" behind a REST API stage."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def openapi_url(request: Request) -> str:
    return root_path(request) + (request.app.openapi_url or "/openapi.json")


@router.get(DOCS_URL)
def swagger_ui(request: Request) -> HTMLResponse:
    root, app = root_path(request), request.app
    return get_swagger_ui_html(
        openapi_url=openapi_url(request),
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
def redoc(request: Request) -> HTMLResponse:
    root = root_path(request)
    return get_redoc_html(
        openapi_url=openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get(ASSETS_URL + "/{name}")
def docs_asset(name: str) -> FileResponse:
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        raise HTTPException(status_code=404)  # the one 404 body, as for any unknown path
    return FileResponse(ASSETS_DIR / name, media_type=media_type)
