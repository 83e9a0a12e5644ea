"""Service-to-service HTTP: mutual TLS plus a signature on every request.

`ServiceClient` is what a node uses to call the coordinator and the coordinator uses to call a
node. Pass `transport=httpx.ASGITransport(app)` to talk to an in-process app (tests); the
signatures are the same either way.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

from confide.auth import sign_request
from confide.errors import AuthenticationError, RemoteError, from_response
from confide.pki import Identity


def client_ssl_context(identity: Identity) -> ssl.SSLContext:
    """TLS context that trusts only the deployment CA and presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identity.ca_path))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(identity.cert_path), str(identity.tls_key_path))
    return ctx


def server_ssl_kwargs(identity: Identity) -> dict[str, Any]:
    """uvicorn arguments for a server that requires a CA-issued client certificate."""
    return {
        "ssl_certfile": str(identity.cert_path),
        "ssl_keyfile": str(identity.tls_key_path),
        "ssl_ca_certs": str(identity.ca_path),
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }


class ServiceClient:
    """Signed JSON calls from `identity` to the service `peer` at `base_url`."""

    def __init__(
        self,
        identity: Identity,
        peer: str,
        base_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.identity = identity
        self.peer = peer
        self.base_url = base_url.rstrip("/")
        verify: ssl.SSLContext | bool = True
        if transport is None and self.base_url.startswith("https://"):
            verify = client_ssl_context(identity)
        self._http = httpx.Client(base_url=self.base_url, verify=verify, transport=transport, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        raw: bool = False,
    ) -> Any:
        """Send one signed request; return the decoded JSON (or bytes with raw=True).

        Raises the ConfideError the peer reported, or RemoteError if it could not be reached.
        """
        if content is None:
            content = b"" if json_body is None else json.dumps(json_body).encode()
        # (httpx drops a query written in `path` when given params=None: pass them only if any)
        url = httpx.URL(path) if params is None else httpx.URL(path, params=params)
        signed_path = url.path + (("?" + url.query.decode()) if url.query else "")
        headers = sign_request(
            self.identity.signing_key, self.identity.name, self.peer, method, signed_path, content
        )
        if content:
            headers["content-type"] = content_type
        try:
            resp = self._http.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise RemoteError(
                f"could not reach {self.peer} at {self.base_url}: {type(exc).__name__}: {exc}",
                peer=self.peer,
            ) from exc
        self._check_peer(resp)
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            raise from_response(resp.status_code, body)
        if raw:
            return resp.content
        if not resp.content:
            return None
        return resp.json()

    def _check_peer(self, resp: httpx.Response) -> None:
        """Over TLS, the server's certificate must name the peer we meant to call.

        Every certificate of the deployment carries the same host names on one machine, so the
        host-name check alone would let any party's service pass as the coordinator's.
        """
        stream = resp.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        if ssl_object is None:
            return
        cert = ssl_object.getpeercert() or {}
        names = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
        if names != [self.peer]:
            raise AuthenticationError(
                f"server at {self.base_url} presented a certificate for {names}, expected {self.peer!r}"
            )

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json_body=body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, json_body=body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)
