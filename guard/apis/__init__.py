"""The guarded OpenAI APIs, one small object each (see :mod:`guard.apis.base`)."""

from guard.apis.base import Api, GuardedRequest
from guard.apis.chat import CHAT
from guard.apis.completions import COMPLETIONS
from guard.apis.responses import RESPONSES

#: Every guarded API; the app mounts each at ``/v1`` + ``api.path``.
GUARDED_APIS: tuple[Api, ...] = (CHAT, COMPLETIONS, RESPONSES)

__all__ = ["Api", "GuardedRequest", "GUARDED_APIS", "CHAT", "COMPLETIONS", "RESPONSES"]
