"""The bearer token a client sends: where it comes from, and the interceptors that attach it.

A worker gets its token from ``token=`` or, so that it never appears on a
command line, from the ``MASSTASKER_TOKEN`` environment variable. Each call
then carries ``authorization: Bearer <token>`` metadata, added by a channel
interceptor so that the raw stub (``client.rpc``) sends it too. Over TLS
this is what gRPC's call credentials would do; unlike them it also works on
a plaintext channel (local development, or a network you trust), which is
the user's choice to make. No error message here repeats the token.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from grpc import aio

__all__ = ["TOKEN_ENV", "AsyncBearerInterceptor", "BearerInterceptor", "resolve_token"]

#: The environment variable a client reads its token from when ``token=`` is not given.
TOKEN_ENV = "MASSTASKER_TOKEN"

if TYPE_CHECKING:
    _SyncBase = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _AsyncBase = aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # generic only in the stubs
    _SyncBase = grpc.UnaryUnaryClientInterceptor
    _AsyncBase = aio.UnaryUnaryClientInterceptor


def resolve_token(token: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token to send: ``token``, else ``$MASSTASKER_TOKEN``, else None; ``""`` means none at all.

    Surrounding whitespace (a trailing newline from a secrets file) is dropped. Raises ValueError,
    without quoting it, if the token could not travel as a header value.
    """
    source = "token"
    if token is None:
        token, source = environ.get(TOKEN_ENV, ""), TOKEN_ENV
    token = token.strip()
    if not token:
        return None
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"the {source} must be printable ASCII without spaces")
    return token


def _entry(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerInterceptor(_SyncBase):
    """Adds the bearer token to every unary call of a blocking channel (``grpc.intercept_channel``)."""

    def __init__(self, token: str) -> None:
        self._entry = _entry(token)

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        """Call on with the token appended to the call's metadata."""
        details = client_call_details
        metadata = (*(details.metadata or ()), self._entry)
        return continuation(
            _CallDetails(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                getattr(details, "compression", None),
            ),
            request,
        )


class AsyncBearerInterceptor(_AsyncBase):
    """Adds the bearer token to every unary call of a ``grpc.aio`` channel."""

    def __init__(self, token: str) -> None:
        self._entry = _entry(token)

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        """Call on with the token appended to the call's metadata."""
        details = client_call_details
        metadata = aio.Metadata(*(details.metadata or ()), self._entry)
        return await continuation(
            aio.ClientCallDetails(
                details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
            ),
            request,
        )
