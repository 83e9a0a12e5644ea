"""FastAPI edge shared by the services: error translation, body limits, request auth.

Errors are translated here once: a `ConfideError` becomes its status code and a JSON body
`{"error": code, "message": ..., "details": ...}`; request validation errors become 400 with
the offending fields named.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from confide import PROTOCOL_VERSION, __version__
from confide.auth import Peer, RequestVerifier
from confide.errors import AuthenticationError, ConfideError, PermissionDenied
from confide.serve import TLS_CLIENT_NAME

log = logging.getLogger("confide.web")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ConfideError)
    async def _confide_error(request: Request, exc: ConfideError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        elif exc.status_code in (401, 403):
            log.warning("%s %s refused: %s", request.method, request.url.path, exc.message)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems)
        return JSONResponse(
            {"error": "invalid", "message": f"invalid request: {summary}", "details": {"problems": problems}},
            status_code=400,
        )


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with 413, before they are buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._reject(send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = (
            b'{"error":"invalid","message":"request body too large (limit %d bytes)"}' % self.limit
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def meta_router(service: str, extra: Callable[[], dict[str, Any]] | None = None) -> APIRouter:
    """`/health` and `/version`, unauthenticated (they reveal nothing about data)."""
    router = APIRouter(tags=["meta"])

    @router.get("/health")
    def health() -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ok", "service": service}
        if extra:
            body.update(extra())
        return body

    @router.get("/version")
    def version() -> dict[str, Any]:
        return {"service": service, "version": __version__, "protocol": PROTOCOL_VERSION}

    return router


async def authenticate(request: Request, verifier: RequestVerifier, **kw: Any) -> Peer:
    """Verify the signed request; the body is read (and cached by Starlette) to hash it."""
    body = await request.body()
    path = request.scope["path"]
    qs = request.scope.get("query_string", b"")
    if qs:
        path += "?" + qs.decode()
    peer = verifier.verify(request.method, path, request.headers, body, **kw)
    # Under mutual TLS (confide.serve): the signer must be the party whose certificate opened
    # the connection, not merely some known identity.
    tls_name = request.scope.get(TLS_CLIENT_NAME)
    if tls_name is not None and tls_name != peer.name:
        raise AuthenticationError(
            f"request signed as {peer.name!r} over a TLS connection authenticated as {tls_name!r}",
            sender=peer.name,
        )
    return peer


def require(*roles: str) -> Callable[[Request], Awaitable[Peer]]:
    """A dependency: the request must be signed by a known party with one of `roles`.

    The role `self` means the service's own identity (its operator's CLI).
    """

    async def dependency(request: Request) -> Peer:
        verifier: RequestVerifier = request.app.state.verifier
        peer = await authenticate(request, verifier)
        effective = "self" if peer.name == verifier.me else peer.role
        if roles and effective not in roles:
            raise PermissionDenied(
                f"{peer.name!r} ({effective}) may not call {request.method} {request.scope['path']}",
                sender=peer.name,
            )
        request.state.peer = peer
        return peer

    return dependency


__all__ = [
    "AuthenticationError",
    "BodyLimitMiddleware",
    "authenticate",
    "install_error_handlers",
    "meta_router",
    "require",
]
