"""Signed requests: unknown identity, bad signature, stale timestamp, replay -> 401 with a reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from confide import pki
from confide.auth import H_SIGNATURE, RequestVerifier, sign_request
from confide.errors import AuthenticationError
from confide.web import install_error_handlers, require


@pytest.fixture
def idents(pki_dir: Path) -> dict[str, pki.Identity]:
    return {n: pki.load_identity(pki_dir / n) for n in ("coordinator", "brand", "partner")}


def make_verifier(idents: dict[str, pki.Identity], clock=time.time) -> RequestVerifier:  # type: ignore[no-untyped-def]
    known = {"brand": (idents["brand"].public_key, "brand")}
    return RequestVerifier("coordinator", known.get, max_skew_s=60, clock=clock)


def signed(ident: pki.Identity, body: bytes = b'{"a":1}', to: str = "coordinator", now: float | None = None,
           path: str = "/v1/x") -> dict[str, str]:
    return sign_request(ident.signing_key, ident.name, to, "POST", path, body, now=now)


def test_valid_request_authenticates(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    peer = v.verify("POST", "/v1/x", signed(idents["brand"]), b'{"a":1}')
    assert (peer.name, peer.role) == ("brand", "brand")


def test_unknown_party(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    with pytest.raises(AuthenticationError, match="unknown party 'partner'"):
        v.verify("POST", "/v1/x", signed(idents["partner"]), b'{"a":1}')


def test_bad_signature_when_body_changed(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    with pytest.raises(AuthenticationError, match="bad signature"):
        v.verify("POST", "/v1/x", signed(idents["brand"]), b'{"a":2}')


def test_bad_signature_when_path_or_method_changed(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    with pytest.raises(AuthenticationError, match="bad signature"):
        v.verify("POST", "/v1/y", signed(idents["brand"]), b'{"a":1}')
    with pytest.raises(AuthenticationError, match="bad signature"):
        v.verify("PUT", "/v1/x", signed(idents["brand"]), b'{"a":1}')


def test_signature_by_another_key_under_a_known_name(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    forged = sign_request(idents["partner"].signing_key, "brand", "coordinator", "POST", "/v1/x", b"")
    with pytest.raises(AuthenticationError, match="bad signature"):
        v.verify("POST", "/v1/x", forged, b"")


def test_stale_timestamp(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    v.started_at = 0
    with pytest.raises(AuthenticationError, match="stale"):
        v.verify("POST", "/v1/x", signed(idents["brand"], now=time.time() - 600), b'{"a":1}')
    with pytest.raises(AuthenticationError, match="stale"):
        v.verify("POST", "/v1/x", signed(idents["brand"], now=time.time() + 600), b'{"a":1}')


def test_replay_is_refused(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    h = signed(idents["brand"])
    v.verify("POST", "/v1/x", h, b'{"a":1}')
    with pytest.raises(AuthenticationError, match="replayed"):
        v.verify("POST", "/v1/x", h, b'{"a":1}')


def test_request_signed_before_restart_is_refused(idents) -> None:  # type: ignore[no-untyped-def]
    h = signed(idents["brand"], now=time.time() - 5)
    v = make_verifier(idents)  # "restarted" after the request was signed: nonce memory is empty
    with pytest.raises(AuthenticationError, match="before this service started"):
        v.verify("POST", "/v1/x", h, b'{"a":1}')


def test_wrong_recipient(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    with pytest.raises(AuthenticationError, match="addressed to 'partner'"):
        v.verify("POST", "/v1/x", signed(idents["brand"], to="partner"), b'{"a":1}')


def test_missing_headers(idents) -> None:  # type: ignore[no-untyped-def]
    v = make_verifier(idents)
    h = signed(idents["brand"])
    del h[H_SIGNATURE]
    with pytest.raises(AuthenticationError, match="missing signature header"):
        v.verify("POST", "/v1/x", h, b'{"a":1}')


def test_http_edge_maps_failures_to_401_and_403(idents) -> None:  # type: ignore[no-untyped-def]
    app = FastAPI()
    install_error_handlers(app)
    app.state.verifier = make_verifier(idents)

    @app.post("/v1/x")
    def x(peer=Depends(require("brand"))):  # type: ignore[no-untyped-def]
        return {"hello": peer.name}

    @app.post("/v1/admin")
    def admin(peer=Depends(require("self"))):  # type: ignore[no-untyped-def]
        return {}

    with TestClient(app) as client:
        body = b'{"a":1}'
        h = signed(idents["brand"], body)
        r = client.post("/v1/x", content=body, headers=h)
        assert r.status_code == 200 and r.json() == {"hello": "brand"}
        r = client.post("/v1/x", content=body, headers=h)  # the same request again
        assert r.status_code == 401 and "replayed" in r.json()["message"]
        r = client.post("/v1/x", content=b'{"a":9}', headers=signed(idents["brand"], body))
        assert r.status_code == 401 and "bad signature" in r.json()["message"]
        r = client.post("/v1/x", content=body)
        assert r.status_code == 401 and "missing signature header" in r.json()["message"]
        r = client.post("/v1/admin", content=body, headers=signed(idents["brand"], body, path="/v1/admin"))
        assert r.status_code == 403 and "may not call" in r.json()["message"]
