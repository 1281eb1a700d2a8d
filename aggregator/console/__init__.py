"""The ops console: one HTML page, plain JS modules and CSS, served from this folder without authentication.

The files hold no data: the page asks the authenticated API for everything with the operator's bearer token
(or the browser's operator certificate), so serving them openly reveals nothing. Only the files present at
start-up are served, by exact name, with a strict Content-Security-Policy (no inline script, no other origin).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

DIR = Path(__file__).resolve().parent
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_console(app: web.Application, prefix: str = "/console") -> None:
    """Serve the console at `<prefix>/` (and redirect `<prefix>` there)."""
    files = {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in DIR.iterdir() if p.suffix in TYPES}

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{prefix}/")

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise web.HTTPNotFound(text=f"no console file {name!r}")
        body, content_type = files[name]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers={
            "Content-Security-Policy": CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        })

    app.router.add_get(prefix, redirect)
    app.router.add_get(f"{prefix}/", serve)
    app.router.add_get(prefix + "/{name}", serve)
