"""The browser playground: a static page at ``/playground`` that calls this front's own API.

The page (HTML, CSS, one script; package data in ``static/``, no build step, nothing from a CDN) holds no data, so
the shell and its small config are open; the data it shows comes from ``/v1/models`` and ``/v1/chat/completions``,
which need the API key like any client's calls. The page asks for the key on a 401 and keeps it in the tab's
``sessionStorage``; it never goes into a URL.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from triton_vlm.openai.config import OpenAIOptions

#: URL -> (file in static/, media type). A fixed list: no path from the request ever reaches the file system.
ASSETS = {
    "/playground": ("playground.html", "text/html; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
}
#: Only this origin's scripts and styles; images from the user's own file (blob:/data:); calls to this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    return resources.files("triton_vlm.openai").joinpath("static").joinpath(name).read_bytes()  # 3.10: one part a call


def install_playground(app: FastAPI, options: OpenAIOptions) -> None:
    """Add ``/playground``, its two assets and ``/playground/config.json`` to ``app`` (none in the OpenAPI
    description: they are the page, not the API)."""
    files = {url: (_read(name), media_type) for url, (name, media_type) in ASSETS.items()}  # read once, at start

    def serve(url: str) -> Any:
        body, media_type = files[url]

        async def asset() -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)

        return asset

    for url in files:
        app.get(url, include_in_schema=False)(serve(url))

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config() -> JSONResponse:
        """What the page checks before it uploads; nothing secret (a 401 or 413 tells as much)."""
        return JSONResponse({"max_image_bytes": options.max_image_bytes, "max_body_bytes": options.max_body_bytes,
                             "api_key_required": bool(options.api_keys),
                             "remote_images": options.allow_remote_images},
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
