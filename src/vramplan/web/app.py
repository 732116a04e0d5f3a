"""The local web app: one page and a JSON API over the estimator (Starlette, served by uvicorn).

Everything the page loads is in this package (``static/``) or in its dependencies: the Vega,
Vega-Lite and vega-embed bundle comes from ``vl-convert-python``, the library the CLI renders the
same charts with, built on first request in a child process (its V8 cannot take this server down).
Nothing is fetched from the network.

Estimates, headroom and fits are answered in the thread pool in milliseconds; plans and sweeps run in a
bounded pool of worker processes (:mod:`._workers`) and are abandoned when their client goes away.
Identical requests are answered from a small cache.

Errors are JSON ``{"error": "…"}``: 400 for malformed JSON, 413 for bodies over 1 MiB, 415 for a
body that is not ``application/json``, 422 for options or configs vramplan refuses, 404 for what
this install lacks; an unexpected failure is a 500 with one line, its traceback only in the log.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import VramplanError
from . import handlers
from ._workers import ClientGone, Workers
from .options import MAX_BODY_BYTES, RequestError, parse_object

__all__ = ["create_app"]

log = logging.getLogger("vramplan.web")

_CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'")
_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"), (b"content-security-policy", _CSP.encode())]


class _SecurityHeaders:
    """Adds the headers above to every response (pure ASGI: no per-request task overhead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _KeepAliveOn500:
    """Answers an unexpected exception with the JSON 500 of :func:`_server_error` and does not re-raise it:
    Starlette's ServerErrorMiddleware re-raises, and the server then drops the keep-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # half a response is out: only closing the connection can end it
                raise
            response = await _server_error(Request(scope), exc)
            await response(scope, receive, send)


class _HostCheck:
    """Refuses requests whose Host header is not one of ``allowed`` (against DNS rebinding): a page on
    another site cannot talk to this server through a name that resolves to 127.0.0.1."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower().strip("[]") for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]  # [::1]:8765, a:8765
            if name not in self.allowed:
                response = JSONResponse({"error": f"unexpected Host header {host!r}; open the address vramplan "
                                                  "serve printed"}, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------- the page


def _static_text(name: str) -> str:
    return (resources.files("vramplan.web") / "static" / name).read_text(encoding="utf-8")


async def _page(request: Request) -> Response:
    return HTMLResponse(_static_text("index.html"), headers={"cache-control": "no-cache"})


_BUNDLE: dict[str, str] = {}
_BUNDLE_LOCK = threading.Lock()


def _vega_bundle() -> str:
    """Vega + Vega-Lite + vega-embed as one script, from vl-convert-python (built once, ~1 s, in a child
    process); when it cannot be built, a script that says why (the page shows its tables without charts)."""
    from ..charts import vl_convert_call

    with _BUNDLE_LOCK:
        if "js" not in _BUNDLE:
            try:  # no snippet: the bundle sets window.vegaEmbed, vega and vegaLite
                _BUNDLE["js"] = vl_convert_call("javascript_bundle").decode("utf-8")
            except VramplanError as err:
                log.warning("charts unavailable: %s", err)
                note = json.dumps(f"Charts are unavailable: {err}")
                _BUNDLE["js"] = f"window.vegaEmbed = undefined; window.vramplanChartNote = {note};"
        return _BUNDLE["js"]


async def _vega(request: Request) -> Response:
    js = await run_in_threadpool(_vega_bundle)
    cache = "no-cache" if "vramplanChartNote" in js[:200] else "max-age=86400"
    return Response(js, media_type="text/javascript", headers={"cache-control": cache})


# ----------------------------------------------------------------------------------------- the API


async def _read_body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, "send the body as JSON with Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, "bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,} (1 MiB)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body is over the limit of {MAX_BODY_BYTES:,} bytes (1 MiB)")
    return parse_object(bytes(raw))


class _Answers:
    """The last answers by route and body (identical requests are common: the page asks again on every edit)."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: what is left to receive is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


Answer = Callable[[Request, dict[str, Any]], Awaitable[Any]]


def _api(answer: Answer, cache: _Answers | None) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        body = await _read_body(request)
        key = f"{request.url.path} {json.dumps(body, sort_keys=True)}"
        result = cache.get(key) if cache is not None else None
        if result is None:
            try:
                result = await answer(request, body)
            except ClientGone:
                return Response(status_code=499)  # nobody is listening
            if cache is not None:
                cache.put(key, result)
        return JSONResponse(result)

    return endpoint


def _get(fn: Callable[[], Any]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(fn))

    return endpoint


async def _gpus(request: Request) -> Response:
    query = dict(request.query_params)
    return JSONResponse(await run_in_threadpool(handlers.gpus, query))


async def _health(request: Request) -> Response:
    from .. import __version__

    return JSONResponse({"status": "ok", "version": __version__})


# ----------------------------------------------------------------------------------------- errors


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _vramplan_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"},
                        status_code=500)


# ----------------------------------------------------------------------------------------- the app


def create_app(trusted_hosts: Sequence[str] | None = None, workers: int = 2) -> Starlette:
    """The ASGI app. ``trusted_hosts``: Host header values to accept (``None``: any), against DNS rebinding;
    ``workers``: processes for plans and sweeps."""

    pool = Workers(workers)
    cache = _Answers()

    async def light(request: Request, body: dict[str, Any]) -> Any:
        command = request.url.path.removeprefix("/api/")
        if command == "headroom":
            return await run_in_threadpool(handlers.headroom, body)
        return await run_in_threadpool(lambda: handlers.run(handlers.job(command, body)))

    async def heavy(request: Request, body: dict[str, Any]) -> Any:
        job = await run_in_threadpool(handlers.job, request.url.path.removeprefix("/api/"), body)
        return await pool.run(handlers.run, job, lambda: _client_gone(request))

    async def chart(request: Request, body: dict[str, Any]) -> Any:
        job = await run_in_threadpool(handlers.chart_job, request.path_params["kind"], body)
        if isinstance(job, dict):
            return job
        return await pool.run(handlers.run, job, lambda: _client_gone(request))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        pool.close()

    routes = [
        Route("/", _page),
        Route("/vendor/vega.js", _vega),
        Mount("/static", StaticFiles(packages=[("vramplan.web", "static")]), name="static"),
        Route("/api/health", _health),
        Route("/api/schema", _get(handlers.schema)),
        Route("/api/models", _get(handlers.models)),
        Route("/api/vision-models", _get(handlers.vision_models)),
        Route("/api/gpus", _gpus),
        Route("/api/estimate", _api(light, cache), methods=["POST"]),
        Route("/api/headroom", _api(light, cache), methods=["POST"]),
        Route("/api/fit", _api(light, cache), methods=["POST"]),
        Route("/api/sweep", _api(heavy, cache), methods=["POST"]),
        Route("/api/plan", _api(heavy, None), methods=["POST"]),  # a plan reports its own elapsed time
        Route("/api/chart/{kind}", _api(chart, cache), methods=["POST"]),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if trusted_hosts is not None:
        middleware.append(Middleware(_HostCheck, allowed=trusted_hosts))
    middleware.append(Middleware(_KeepAliveOn500))  # innermost: below it only the routes and 4xx handlers
    return Starlette(
        routes=routes, middleware=middleware, lifespan=lifespan,
        exception_handlers={RequestError: _request_error, VramplanError: _vramplan_error,
                            HTTPException: _http_error, Exception: _server_error},
    )

