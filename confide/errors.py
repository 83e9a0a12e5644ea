"""The one error hierarchy of Confide.

Library code raises these; they are translated once at the edge: the FastAPI handler in
`confide.web` maps them to HTTP status codes, the CLI maps them to exit codes. Messages say
what was wrong and, where it helps, what to do.

    ConfideError
    ├── ValidationError        400  bad input (names the field / file / row)
    ├── AuthenticationError    401  unknown identity, bad signature, stale or replayed request
    ├── PermissionDenied       403  authenticated, but not allowed (outside the agreement, ...)
    ├── NotFound               404
    ├── Conflict               409  state does not allow it (already signed, job finished, ...)
    ├── AgreementError         403  agreement missing, unsigned, tampered or expired
    ├── ProtocolError          400  out-of-order, malformed or replayed protocol message
    ├── RemoteError            502  a peer service answered with an error or not at all
    └── ConfigurationError     500  the service or CLI is set up wrongly
"""

from __future__ import annotations

from typing import Any


class ConfideError(Exception):
    """Base of every error Confide raises on purpose."""

    status_code = 500
    exit_code = 1
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class ValidationError(ConfideError):
    status_code = 400
    exit_code = 2
    code = "invalid"


class AuthenticationError(ConfideError):
    status_code = 401
    exit_code = 3
    code = "unauthenticated"


class PermissionDenied(ConfideError):
    status_code = 403
    exit_code = 3
    code = "forbidden"


class AgreementError(PermissionDenied):
    code = "agreement"


class NotFound(ConfideError):
    status_code = 404
    exit_code = 4
    code = "not_found"


class Conflict(ConfideError):
    status_code = 409
    exit_code = 5
    code = "conflict"


class ProtocolError(ConfideError):
    status_code = 400
    exit_code = 2
    code = "protocol"


class RemoteError(ConfideError):
    status_code = 502
    exit_code = 6
    code = "remote"


class ConfigurationError(ConfideError):
    status_code = 500
    exit_code = 7
    code = "configuration"


_BY_CODE = {
    cls.code: cls
    for cls in (
        ValidationError,
        AuthenticationError,
        PermissionDenied,
        AgreementError,
        NotFound,
        Conflict,
        ProtocolError,
        RemoteError,
        ConfigurationError,
    )
}


def from_response(status: int, body: Any) -> ConfideError:
    """Rebuild the error a peer service reported, so callers can catch it by type."""
    if isinstance(body, dict) and body.get("error") in _BY_CODE:
        cls = _BY_CODE[body["error"]]
        details = dict(body.get("details") or {})
        details["status"] = status
        return cls(str(body.get("message", "")), **details)
    return RemoteError(f"peer answered HTTP {status}: {str(body)[:300]}", status=status)
