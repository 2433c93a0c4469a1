"""The dashboard's web views: one page (overview, per program, per model, alerts) that polls a JSON API.

=========================  ==================================================================================
``GET /``                  the page: inline SVG charts drawn by ``static/dashboard.js``; nothing external
``GET /api/snapshot``      the same :class:`~agents.dashboard.core.DashboardSnapshot` the bus endpoint
                           ``dashboard.snapshot`` returns; query ``program``, ``model``, ``metric``,
                           ``max_points``, ``since``
``GET /healthz``           ``{"ok": true}``
=========================  ==================================================================================

:func:`running_web` serves an app with uvicorn inside the caller's task group and yields its URL; leaving the
block stops it (in-flight responses finish first).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files

import anyio
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from agents.dashboard.core import DashboardSnapshot, SnapshotQuery
from bus import ConfigurationError
from bus.messages import field_errors_of

log = logging.getLogger("dspyrt.dashboard.web")

SnapshotSource = Callable[[SnapshotQuery], DashboardSnapshot]

_SECURITY_HEADERS = {
    # Nothing but this server: no CDN, no fonts, no beacons.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


def _asset(name: str) -> str:
    return (files("agents.dashboard") / "static" / name).read_text(encoding="utf-8")


def create_app(source: SnapshotSource, *, poll_interval: float = 2.0) -> Starlette:
    """The web app over ``source`` (the dashboard's snapshot function); the page polls every
    ``poll_interval`` seconds."""
    page = _asset("index.html").replace("{{POLL_MS}}", str(max(250, int(poll_interval * 1000))))
    assets = {name: _asset(name) for name in _ASSETS}

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=_SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return Response("not found", status_code=404, headers=_SECURITY_HEADERS)
        return Response(assets[name], media_type=_ASSETS[name], headers=_SECURITY_HEADERS)

    async def snapshot(request: Request) -> Response:
        params = dict(request.query_params)
        try:
            query = SnapshotQuery.model_validate(params)
        except ValidationError as exc:
            errors = field_errors_of(exc)
            body = {
                "code": "invalid_message",
                "message": f"bad query: {errors[0].loc}: {errors[0].message}" if errors else "bad query",
                "field_errors": [e.model_dump() for e in errors],
            }
            return JSONResponse(body, status_code=400, headers=_SECURITY_HEADERS)
        data = source(query).model_dump_json()
        return Response(data, media_type="application/json", headers=_SECURITY_HEADERS)

    async def healthz(request: Request) -> Response:
        return Response(json.dumps({"ok": True}), media_type="application/json", headers=_SECURITY_HEADERS)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/static/{name}", static),
            Route("/api/snapshot", snapshot),
            Route("/healthz", healthz),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process's owner (the supervisor) handles signals, and
    leaving :func:`running_web` stops the server."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); :class:`ConfigurationError` when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"dashboard web view cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@asynccontextmanager
async def running_web(app: Starlette, sock: socket.socket) -> AsyncIterator[str]:
    """Serve ``app`` on the listening socket ``sock`` (see :func:`listen`) for the block; yield its URL. The
    socket is closed when the block ends."""
    server = _EmbeddedServer(
        uvicorn.Config(app, log_config=None, lifespan="off", access_log=False, timeout_graceful_shutdown=2)
    )
    finished = anyio.Event()

    async def serve() -> None:
        # Shielded: uvicorn must run its own shutdown (close the socket, finish responses) to the end.
        with anyio.CancelScope(shield=True):
            try:
                await server.serve(sockets=[sock])
            finally:
                sock.close()
                finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        try:
            with anyio.fail_after(10):
                while not server.started:
                    if finished.is_set():
                        raise ConfigurationError("the dashboard web view stopped while starting")
                    await anyio.sleep(0.01)
            yield url_of(sock)
        finally:
            server.should_exit = True
