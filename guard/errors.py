"""Errors the proxy can name, rendered in the OpenAI error shape.

OpenAI SDKs map the HTTP status to an exception type and read
``{"error": {"message", "type", "param", "code"}}``; every error the guard produces
uses that shape so clients need no special handling.
"""

from __future__ import annotations

import json


class ProxyError(Exception):
    """An error with a status and OpenAI-style fields, raised anywhere on the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, code=code, param=param)


def upstream_unreachable(detail: str) -> ProxyError:
    return ProxyError(502, f"upstream unreachable: {detail}", type="upstream_error", code="upstream_unreachable")


def upstream_protocol(detail: str) -> ProxyError:
    return ProxyError(502, f"upstream connection failed: {detail}", type="upstream_error", code="upstream_protocol_error")


def upstream_timeout(detail: str) -> ProxyError:
    return ProxyError(504, f"upstream timed out: {detail}", type="upstream_error", code="upstream_timeout")
