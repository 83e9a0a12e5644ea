"""Serving a FastAPI app with uvicorn, with mutual TLS unless told otherwise."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from confide.pki import Identity
from confide.settings import ServiceSettings
from confide.transport import server_ssl_kwargs


def serve(app: FastAPI, settings: ServiceSettings, identity: Identity) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kwargs = server_ssl_kwargs(identity) if settings.tls else {}
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
        **kwargs,
    )
