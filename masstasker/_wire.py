"""Conventions between our server and our client that the protobuf schema does not carry.

A Go peer ignores all of these.
"""

__all__ = ["RETRY_AFTER_MS"]

#: Trailing-metadata key on a rejection that will likely succeed later: milliseconds to wait before
#: asking again. The server sends it when its waiting-Query limits are full; the client's waiting
#: ``query`` then pauses (with jitter) and asks again instead of failing.
RETRY_AFTER_MS = "masstasker-retry-after-ms"
