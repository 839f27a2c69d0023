"""The request headers that say whose call it is, and a digest of them for keying per-client state.

The prober's breaker and dialect state and the stored-context cache are keyed by these, so one
client's key (or a gateway's per-key routing) never shares state with another's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

#: Headers that carry a client's credentials or select its account upstream.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "openai-organization", "openai-project")


def credential_digest(prefix: bytes, headers: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``prefix`` and the credential headers of ``headers`` (absent ones as empty)."""
    h = hashlib.sha256(prefix)
    for name in CREDENTIAL_HEADERS:
        value = headers.get(name)
        h.update(b"\0" + (value.encode("latin-1", "replace") if isinstance(value, str) else value or b""))
    return h.hexdigest()
