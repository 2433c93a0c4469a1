"""The dashboard's web views: one page (overview, per program, per model, alerts) that polls a JSON API.

=========================  ==================================================================================
``GET /``                  the page: inline SVG charts drawn by ``static/dashboard.js``; nothing external
``GET /api/snapshot``      the same :class:`~dspyrt.agents.dashboard.models.DashboardSnapshot` the bus endpoint
                           ``dashboard.snapshot`` returns; query ``program``, ``model``, ``metric``,
                           ``max_points``, ``since``
``GET /healthz``           ``{"ok": true}``
=========================  ==================================================================================

Every route is behind one guard (:class:`WebAccess`), checked before anything else:

- ``Host`` must name one of the configured hosts (port or not): anything else is 400, so a page on another
  site cannot reach the dashboard through a name it controls (DNS rebinding);
- with a token, every request must carry it: ``Authorization: Bearer <token>``, or the session cookie a browser
  gets by opening ``/?token=<token>`` once (HttpOnly, SameSite=Strict, Secure over https; it holds a digest
  of the token, not the token). Otherwise 401 with ``WWW-Authenticate: Bearer``. Tokens are compared in
  constant time and never logged.

:func:`running_web` serves an app with uvicorn inside the caller's task group and yields its URL; leaving the
block stops it (in-flight responses finish first).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib.resources import files

import anyio
import uvicorn
from pydantic import SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dspyrt.agents.dashboard.models import DashboardSnapshot, SnapshotQuery
from dspyrt.bus import ConfigurationError
from dspyrt.bus.messages import field_errors_of
from dspyrt.runtime.config import DEFAULT_DASHBOARD_HOSTS, env_name, host_pattern

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
    return (files("dspyrt.agents.dashboard") / "static" / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- access

MIN_TOKEN_LENGTH = 16
SESSION_COOKIE = "dspyrt_dashboard_session"
SESSION_MAX_AGE = 7 * 24 * 3600
_PORT = re.compile(r"[0-9]{0,5}")
_LOGIN_PAGE = (
    '<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=./">'
    '<title>dspyrt dashboard</title><p><a href="./">Continue to the dashboard</a></p>'
)


def request_host(header: str | None) -> str | None:
    """The host a ``Host`` header names (its port dropped), normalized as :func:`host_pattern` does; ``None``
    when the header is missing or malformed."""
    text = (header or "").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
    if not host or "*" in host or not _PORT.fullmatch(port):
        return None
    try:
        return host_pattern(host)
    except ValueError:
        return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps a server on this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    address = _address(host)
    return host.strip().lower() == "localhost" or (address is not None and address.is_loopback)


def is_wildcard(host: str) -> bool:
    """Whether listening on ``host`` means every interface (``0.0.0.0``, ``::``)."""
    address = _address(host)
    return host.strip() in {"", "*"} or (address is not None and address.is_unspecified)


@dataclass(frozen=True)
class WebAccess:
    """Who may use the web view: requests whose ``Host`` names one of ``hosts`` (see :func:`host_pattern`) and
    that carry ``token`` when there is one. The default: loopback names, no token."""

    hosts: frozenset[str] = frozenset(DEFAULT_DASHBOARD_HOSTS)
    token: SecretStr | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", frozenset(host_pattern(h) for h in self.hosts))
        if self.token is not None and len(self.token.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the dashboard token has fewer than {MIN_TOKEN_LENGTH} characters: use a long random one "
                "(openssl rand -hex 32)"
            )

    def allows_host(self, host: str) -> bool:
        return any(
            pattern in ("*", host) or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.hosts
        )


def web_access(
    bind_host: str, hosts: Iterable[str], token_env: str | None, environ: Mapping[str, str] | None = None
) -> WebAccess:
    """The guard of a web view listening on ``bind_host``: ``hosts``, plus the bind address itself when it is one
    address rather than a wildcard, and the token held by the environment variable named ``token_env`` (its
    surrounding whitespace dropped). :class:`ConfigurationError` when that variable is unset or empty, or when
    the view would listen beyond loopback without a token."""
    env = os.environ if environ is None else environ
    allowed = set(hosts)
    if not is_wildcard(bind_host):
        allowed.add(bind_host)
    token: SecretStr | None = None
    if token_env:
        value = env.get(env_name(token_env), "").strip()
        if not value:
            raise ConfigurationError(
                f"DSPYRT_DASHBOARD_TOKEN_ENV names {token_env}, which is not set or empty: no dashboard web view"
            )
        token = SecretStr(value)
    elif not is_loopback(bind_host):
        raise ConfigurationError(
            f"the dashboard web view would listen on {bind_host} without a token: set DSPYRT_DASHBOARD_TOKEN_ENV "
            "to the name of an environment variable holding one, or listen on 127.0.0.1"
        )
    try:
        return WebAccess(frozenset(allowed), token)
    except ValueError as exc:
        raise ConfigurationError(f"dashboard web view: {exc}") from exc


def _refusal(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = {"code": code, "message": message}
    return JSONResponse(body, status_code=status, headers={**_SECURITY_HEADERS, **(headers or {})})


class _Guard:
    """The Host check, then the token (see the module docstring), in front of every route."""

    def __init__(self, app: ASGIApp, access: WebAccess) -> None:
        self.app = app
        self.access = access
        self._secrets: tuple[bytes, bytes] | None = None
        if access.token is not None:
            token = access.token.get_secret_value().encode()
            # The cookie holds a digest of the token: browsers do not store the token itself.
            self._secrets = (token, hmac.new(token, b"dspyrt dashboard session", hashlib.sha256).hexdigest().encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request_host(request.headers.get("host"))
        response: Response
        if host is None or not self.access.allows_host(host):
            response = _refusal(
                400, "invalid_host", "this dashboard does not answer to that Host (see DSPYRT_DASHBOARD_HOSTS)"
            )
        elif self._secrets is None:
            await self.app(scope, receive, send)
            return
        elif scope["path"] == "/" and request.method in ("GET", "HEAD") and "token" in request.query_params:
            response = self._login(request, *self._secrets)
        elif self._authorized(request, *self._secrets):
            await self.app(scope, receive, send)
            return
        else:
            presented = "authorization" in request.headers or SESSION_COOKIE in request.cookies
            response = self._unauthorized(invalid=presented)
        await response(scope, receive, send)

    @staticmethod
    def _authorized(request: Request, token: bytes, session: bytes) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token):
            return True
        cookie = request.cookies.get(SESSION_COOKIE)
        return cookie is not None and hmac.compare_digest(cookie.encode(), session)

    def _login(self, request: Request, token: bytes, session: bytes) -> Response:
        """``/?token=``: a browser's way in. The cookie comes with a page that moves on to ``./`` by itself: the
        token leaves the address bar, and the SameSite=Strict cookie is sent even when the link was followed
        from another site (an HTTP redirect would still carry that site's context)."""
        if not hmac.compare_digest(request.query_params["token"].strip().encode(), token):
            return self._unauthorized(invalid=True)
        response = HTMLResponse(_LOGIN_PAGE, headers=_SECURITY_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            session.decode(),
            max_age=SESSION_MAX_AGE,
            path=None,  # the page's own directory: right under a proxy's path prefix too
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @staticmethod
    def _unauthorized(*, invalid: bool) -> Response:
        challenge = 'Bearer realm="dspyrt dashboard"' + (', error="invalid_token"' if invalid else "")
        message = (
            "this dashboard needs its token: send 'Authorization: Bearer <token>', or open /?token=<token> once "
            "in a browser"
        )
        return _refusal(401, "unauthorized", message, {"WWW-Authenticate": challenge})


def create_app(source: SnapshotSource, *, poll_interval: float = 2.0, access: WebAccess | None = None) -> Starlette:
    """The web app over ``source`` (the dashboard's snapshot function); the page polls every
    ``poll_interval`` seconds. ``access``: who may use it (default: loopback host names, no token)."""
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
        ],
        middleware=[Middleware(_Guard, access=access if access is not None else WebAccess())],
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process's owner (the supervisor) handles signals, and
    leaving :func:`running_web` stops the server."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


PORT_SETTING = "DSPYRT_DASHBOARD_PORT"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listen(host: str, port: int, *, explicit: bool = True) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); :class:`ConfigurationError` when that fails.

    ``explicit``: the user chose ``port`` (``DSPYRT_DASHBOARD_PORT``). When they did not, it is only the default,
    and a default that another process holds (a second ``dspyrt up`` on the same machine) gives way to a free
    port: the caller reports the URL it got. A port the user chose is not replaced: the error names the setting.
    """
    try:
        return _bind(host, port)
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        if in_use and not explicit and port != 0:
            log.warning("dashboard web view: the default port %s is taken on %s, taking a free one", port, host)
            return listen(host, 0)
        reason = exc.strerror or str(exc)
        remedy = (
            f" ({PORT_SETTING}={port}: set {PORT_SETTING} to a free port, 0 for any free one, or off for no page)"
            if in_use and explicit
            else ""
        )
        raise ConfigurationError(f"dashboard web view cannot listen on {host}:{port}: {reason}{remedy}") from exc


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
