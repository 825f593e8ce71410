"""The API reference pages, ``/docs`` (Swagger UI) and ``/redoc``, with their scripts pinned.

FastAPI's defaults load ``swagger-ui-dist@5`` and ``redoc@2`` from cdn.jsdelivr.net: a floating
major version with no integrity hash, on the page where an admin pastes the admin token, so
whatever the CDN served under that name ran with the token in reach. Each asset here is an
exact version with its Subresource Integrity hash (the SHA-384 of the file in the package's npm
tarball, which jsDelivr serves as is): the browser refuses a file that differs. ReDoc's page
loads no Google Fonts either. To move to a newer version, change the URL and its hash together
(docs/api.md says how to compute it).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

__all__ = ["ASSETS", "install"]

_CDN = "https://cdn.jsdelivr.net/npm"
SWAGGER_JS = f"{_CDN}/swagger-ui-dist@5.35.0/swagger-ui-bundle.js"
SWAGGER_CSS = f"{_CDN}/swagger-ui-dist@5.35.0/swagger-ui.css"
REDOC_JS = f"{_CDN}/redoc@2.5.4/bundles/redoc.standalone.js"
# url: its SRI hash (https://www.w3.org/TR/SRI/), openssl dgst -sha384 -binary FILE | base64
ASSETS = {
    SWAGGER_JS: "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
    SWAGGER_CSS: "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
    REDOC_JS: "sha384-w447zOpYfw/1Tv/5AK9NfHTlQIqE3RVR6KY62jCyy9zNDgO64cMwGGP1Fj0zJVf5",
}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
# FastAPI's pages take their icon from fastapi.tiangolo.com: a request to a third party, with no
# integrity hash, from the page the admin token is pasted into. An empty data: URL asks nothing.
NO_ICON = "data:,"


def _with_integrity(page: HTMLResponse) -> HTMLResponse:
    """FastAPI's page with ``integrity`` and ``crossorigin`` on each pinned asset's tag (its
    templates have no parameter for them)."""
    html = bytes(page.body).decode()
    for url, digest in ASSETS.items():
        html = html.replace(f'"{url}"', f'"{url}" integrity="{digest}" crossorigin="anonymous"')
    return HTMLResponse(html)


def install(app: FastAPI) -> None:
    """``/docs``, its OAuth2 redirect and ``/redoc``, as FastAPI serves them when its
    ``docs_url`` and ``redoc_url`` are set (the app is made with both None)."""

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=SWAGGER_JS,
            swagger_css_url=SWAGGER_CSS,
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
            swagger_favicon_url=NO_ICON,
        )
        return _with_integrity(page)

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=REDOC_JS,
            with_google_fonts=False,
            redoc_favicon_url=NO_ICON,
        )
        return _with_integrity(page)

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT, oauth2_redirect, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)
