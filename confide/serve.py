"""Serving a FastAPI app with uvicorn, with mutual TLS unless told otherwise.

Under mutual TLS the server also tells the app *who* is on the other end of the connection:
the common name of the CA-verified client certificate goes into each request's ASGI scope
(`TLS_CLIENT_NAME`), and `confide.web.authenticate` refuses a request signed by any other
identity. A stolen identity key is then not enough to act as its party: the thief would also
need that party's TLS key (docs/threat-model.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from confide.pki import Identity
from confide.settings import ServiceSettings
from confide.transport import server_ssl_kwargs

TLS_CLIENT_NAME = "confide.tls_client_name"


def client_cert_name(transport: asyncio.BaseTransport) -> str | None:
    """The common name of the peer's verified TLS certificate (None without TLS)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert() or {}
    names = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    # CERT_REQUIRED: a TLS connection without a verified client certificate never gets here;
    # a certificate without a CN gets a name no identity has, so every signed request fails.
    return names[0] if names else ""


class PeerNamingHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, plus the client certificate's name in every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        name = client_cert_name(transport)
        if name is None:
            return
        app = self.app

        async def named(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope.get("type") in ("http", "websocket"):
                scope = {**scope, TLS_CLIENT_NAME: name}
            await app(scope, receive, send)

        self.app = named


def serve(app: FastAPI, settings: ServiceSettings, identity: Identity) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kwargs: dict[str, Any] = {**server_ssl_kwargs(identity), "http": PeerNamingHTTP} if settings.tls else {}
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        **kwargs,
    )
