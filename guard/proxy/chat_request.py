"""The chat request under its historical names (``guard.apis.chat`` holds the code).

The proxy forwards the client's bytes unchanged; parsing only decides whether the body *is*
a chat request (so a bad one gets a 400 here instead of a confusing upstream error) and
extracts the few fields the guard reads.
"""

from __future__ import annotations

from guard.apis.base import GuardedRequest
from guard.apis.chat import CHAT, message_text

ChatRequest = GuardedRequest
parse_chat_request = CHAT.parse

__all__ = ["ChatRequest", "message_text", "parse_chat_request"]
