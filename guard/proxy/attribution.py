"""Which client sent a request: the datapoint's ``client`` field (issue 23, row 6).

With inbound ``api_keys`` the client is the *name* of the key it authenticated with
(``guard.app.check_api_key``; names come from ``api_keys`` given as a mapping, else ``key-1``,
``key-2``, ... by position). Without them it is :class:`ClientHasher`'s keyed hash of the credential
the client sent upstream (``Authorization`` bearer token, else ``api-key``, else ``x-api-key``):
HMAC-SHA256 under the deployment's ``prompt_hash_key`` with its own domain prefix, cut to
:data:`CLIENT_HEX` hex digits. So the log can tell clients apart (``calibrate`` reports, caps and
excludes them) but never holds a key, and a guessed key cannot be confirmed from the log without
the deployment's secret. A request with no credential has no ``client`` (null).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

#: Hex digits of a hashed client id (64 bits: no collisions among any realistic number of keys).
CLIENT_HEX = 16
#: Request headers holding a client's credential, in the order they are looked at.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")
_DOMAIN = b"refusal-guard client\0"


class ClientHasher:
    """The keyed client id of a request's credential (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def credential(self, headers: Mapping[str, Any]) -> bytes | None:
        for name in CLIENT_CREDENTIAL_HEADERS:
            value = headers.get(name)
            if isinstance(value, str):
                value = value.encode("latin-1", "replace")
            if not value:
                continue
            if name == "authorization" and value[:7].lower() == b"bearer ":
                value = value[7:].strip()
            if value:
                return value
        return None

    def __call__(self, headers: Mapping[str, Any]) -> str | None:
        credential = self.credential(headers)
        if credential is None:
            return None
        return hmac.new(self._key, _DOMAIN + credential, hashlib.sha256).hexdigest()[:CLIENT_HEX]

    def __repr__(self) -> str:  # never show the key
        return "ClientHasher(<key>)"
