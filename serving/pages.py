"""The web page at GET / and its files (serving/static/: plain HTML, CSS and JavaScript
modules; no build step, nothing loaded from another host). The page uses only the public
routes (/model, /score, /explain, /enhance), with the API key the person types when the
service asks for one; the page and its files themselves need no key (they hold no data)."""
import os

from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_PREFIX = "/static"
# The page runs only its own files and talks only to this service; images it shows are
# the person's own files (blob:) and the pictures the service returns (data:).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new version of the page shows on the next load
}


def add_pages(app) -> None:
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(os.path.join(STATIC_DIR, "favicon.ico"), media_type="image/x-icon")
