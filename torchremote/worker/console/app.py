"""The console's web server: aiohttp on a thread and event loop of its own, beside the worker.

Routes: the pages (`/`, `/data`, `/clients`, `/requests`, `/log`), the part of each that the page's
script refreshes (`/fragment/<page>`), the decisions (`POST /requests/<id>/approve|deny`), sign-in
and sign-out, `/metrics`, and two static files. Every response carries the security headers;
every POST needs the session's CSRF token and, when the browser names one, this console's origin.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web

from ...wire.errors import WorkerPermissionError
from ..metrics import WorkerMetrics
from . import pages
from .auth import SESSION_LIFETIME_S, ConsoleAuth, ConsoleSession, SignInRefused, csrf_ok
from .recent_log import RecentLog

if TYPE_CHECKING:
    from ..server import WorkerServer

COOKIE = "torchremote_console"
STATIC = Path(__file__).with_name("static")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",   # the sign-in link carries a token: never to another site
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Console:
    """Serves the owner's console for `server` on `host:port` (0: a free port), with TLS when given."""

    def __init__(self, server: "WorkerServer", host: str = "127.0.0.1", port: int = 0, *,
                 tls: ssl.SSLContext | None = None, metrics_public: bool = False) -> None:
        loopback = _is_loopback(host)
        if metrics_public and not loopback:
            raise WorkerPermissionError("--metrics-public opens /metrics to anyone who can reach it: "
                                        "only on a loopback console host")
        self.server = server
        self.tls = tls is not None
        self.metrics_public = metrics_public
        self.auth = ConsoleAuth(server._owner_token, server._token)
        self.metrics = WorkerMetrics(server)
        self.recent = RecentLog(server.log)
        self._rates: deque[tuple[float, int]] = deque(maxlen=8)  # (time, ops so far), for ops per second
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.host, self.port = host, self._socket.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if self.tls else 'http'}://{shown}:{self.port}"
        # a page on another name for this address (DNS rebinding) is refused
        self._hosts = ({f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")} | {f"{shown}:{self.port}"}
                       if loopback else None)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(tls, started), daemon=True,
                                        name=f"torchremote-console-{server.id}")
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise self._error

    def login_link(self) -> str:
        """A new one-time sign-in link."""
        return f"{self.url}/login?token={self.auth.new_link_token()}"

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            except Exception:  # stopping anyway: the worker must not hang on its console
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self.recent.detach()

    # --- the server's thread ---
    def _serve(self, tls: ssl.SSLContext | None, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start(tls))
        except BaseException as e:  # reported to the constructor
            self._error = e
            started.set()
            return
        started.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self, tls: ssl.SSLContext | None) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.add_routes([
            web.get("/login", self._login_link), web.post("/login", self._login_form),
            web.post("/logout", self._logout),
            web.get("/", self._page), web.get("/{page:data|clients|requests|log}", self._page),
            web.get("/fragment/{page:overview|data|clients|requests|log}", self._fragment),
            web.post("/requests/{id:\\d+}/{decision:approve|deny}", self._decide),
            web.get("/metrics", self._metrics),
            web.get("/static/{name:console\\.(js|css)}", self._static),
        ])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket, ssl_context=tls).start()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_rates())

    async def _shutdown(self) -> None:
        self._sampler.cancel()
        await self._runner.cleanup()

    async def _sample_rates(self) -> None:
        while True:
            self._rates.append((time.monotonic(), self.server.traffic().ops))
            await asyncio.sleep(1.0)

    def _ops_per_s(self) -> float:
        if len(self._rates) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._rates[0], self._rates[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    # --- every request ---
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if self._hosts is not None and request.host not in self._hosts:
                raise web.HTTPForbidden(text=f"this console answers to {self.host}:{self.port} only")
            if request.method == "POST" and not self._same_origin(request):
                self._refuse_post(request, "from another origin")
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update(SECURITY_HEADERS)
            raise
        response.headers.update(SECURITY_HEADERS)
        return response

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        return origin is None or origin == f"{'https' if self.tls else 'http'}://{request.host}"

    def _refuse_post(self, request: web.Request, why: str) -> None:
        self.server.log.warning("console: refused a POST to %s %s (peer %s)", request.path, why, request.remote)
        raise web.HTTPForbidden(text=f"refused: a request {why}; reload the console and try again")

    def _session(self, request: web.Request) -> ConsoleSession | None:
        return self.auth.session(request.cookies.get(COOKIE))

    def _signed_in(self, request: web.Request) -> ConsoleSession:
        session = self._session(request)
        if session is None:
            if request.path.startswith(("/fragment/", "/metrics")) or request.method == "POST":
                raise web.HTTPUnauthorized(text="sign in first")
            raise web.HTTPSeeOther("/login")
        return session

    # --- signing in and out ---
    async def _login_link(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token")
        if token is None:
            return _html(pages.sign_in_page())
        return self._sign_in(request, token)

    async def _login_form(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        return self._sign_in(request, str(form.get("token", "")))

    def _sign_in(self, request: web.Request, token: str) -> web.StreamResponse:
        peer = request.remote or "?"
        try:
            session = self.auth.sign_in(token, peer)
        except SignInRefused as e:
            self.metrics.collector.failed_sign_ins += 1
            self.server.log.warning("console: refused a sign-in from %s: %s (%d failed in the last minute)",
                                    peer, e, self.auth.failures(peer))
            return _html(pages.sign_in_page(str(e)), status=429 if e.limited else 403)
        self.server.log.info("console: %s signed in with the %s", peer, session.how)
        response = web.HTTPSeeOther("/")
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", secure=self.tls, path="/",
                            max_age=SESSION_LIFETIME_S)
        raise response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        form = await request.post()
        if not csrf_ok(session, form.get("csrf")):
            self._refuse_post(request, "without this session's CSRF token")
        self.auth.sign_out(session.id)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # --- pages ---
    async def _page(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        name = request.match_info.get("page", "overview")
        return _html(pages.page(self.server.id, name, self._render(name, session), session.csrf))

    async def _fragment(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        return _html(self._render(request.match_info["page"], session))

    def _render(self, name: str, session: ConsoleSession) -> str:
        if name == "overview":
            return pages.overview(self.server, self._ops_per_s())
        if name == "data":
            return pages.data(self.server)
        if name == "clients":
            return pages.clients(self.server)
        if name == "requests":
            return pages.requests(self.server, session.csrf)
        return pages.log(self.recent.lines())

    async def _decide(self, request: web.Request) -> web.StreamResponse:
        session = self._signed_in(request)
        form = await request.post()
        if not csrf_ok(session, form.get("csrf")):
            self._refuse_post(request, "without this session's CSRF token")
        request_id = int(request.match_info["id"])
        by = f"owner (console, {session.how})"
        try:
            if request.match_info["decision"] == "approve":
                self.server.releases.approve(request_id, by=by)
            else:
                self.server.releases.deny(request_id, str(form.get("reason", ""))[:2000], by=by)
        except (LookupError, WorkerPermissionError) as e:
            return _html(pages.page(self.server.id, "requests", f'<p class="error">{pages.esc(e)}</p>'
                                    + pages.requests(self.server, session.csrf), session.csrf), status=409)
        raise web.HTTPSeeOther("/requests")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if not self.metrics_public and self._session(request) is None:
            presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not self.auth.is_owner_token(presented):
                raise web.HTTPUnauthorized(text="sign in, or send the owner token as 'Authorization: Bearer ...'")
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(body=(STATIC / name).read_bytes(), content_type=kind, charset="utf-8")


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, content_type="text/html", charset="utf-8", status=status)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
