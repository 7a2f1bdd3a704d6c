"""What every store shares with the service: the errors beyond the request's own mistakes."""

from __future__ import annotations

__all__ = ["StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store cannot be reached or did not answer in time; nothing was changed, or the change is unknown.

    The service answers UNAVAILABLE with this message, which names the store:
    clients retry such calls.
    """
