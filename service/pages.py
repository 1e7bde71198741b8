"""The pages the service serves for people, all working offline (catalogs often live on
hosts with no way out to a CDN, where FastAPI's default doc pages are blank):

- `/`: the operator console (`console/`: plain HTML, CSS and JavaScript against the API:
  search with a clip and see where it matches, browse and delete tracks, ingest files or an
  archive and follow the jobs);
- `/docs` (Swagger UI) and `/redoc`, with their scripts and styles served from the
  `fastapi-offline` package (MIT; it ships the Swagger UI and ReDoc bundles).
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
CONSOLE = resources.files("refrain.service") / "console"


def install(app: FastAPI) -> None:
    """Serve the console, `/docs`, `/redoc` and their assets; create the app with
    docs_url=None and redoc_url=None so that FastAPI's CDN pages are not registered."""
    app.mount("/console", StaticFiles(directory=str(CONSOLE)), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(str(CONSOLE / "index.html"), media_type="text/html")

    static = resources.files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
