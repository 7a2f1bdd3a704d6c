"""Bearer-token authentication for the gRPC service and the metrics listener.

Accepted tokens come from a file, one per line (blank lines and lines
starting with ``#`` are skipped), re-read by :meth:`TokenSet.reload` (the CLI
calls it on SIGHUP) so tokens rotate without a restart: list the new token
next to the old one, reload, move the workers over, drop the old one, reload.

Only SHA-256 digests of the tokens are kept, and a presented token is hashed
and compared against every digest with :func:`hmac.compare_digest`: the time
a check takes says nothing about which tokens exist or how long they are.
No token, nor any line of the file, ever goes into a log or an error message.

:class:`TokenInterceptor` is installed only when a token file is given, so a
server without authentication pays nothing per call. The health service stays
open for load-balancer and Kubernetes probes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

__all__ = ["HEALTH_PREFIX", "TokenInterceptor", "TokenSet", "bearer_problem", "load_tokens"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the classes are generic only in the stubs
    _Interceptor = grpc.aio.ServerInterceptor

#: Methods under this prefix need no token.
HEALTH_PREFIX = "/grpc.health.v1.Health/"

_SCHEME = "bearer "
_HOW = "send the metadata 'authorization: Bearer <token>'"
MISSING = f"missing authorization: {_HOW}"
MALFORMED = f"authorization is not a bearer token: {_HOW}"
REJECTED = "the bearer token is not accepted"


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def load_tokens(path: str) -> frozenset[bytes]:
    """The SHA-256 digests of the tokens in ``path``.

    Raises OSError if the file cannot be read and ValueError if it holds no
    token (a server that accepts nothing is a mistake, not a policy).
    Messages never quote the file's content.
    """
    with open(path, "rb") as file:
        lines = file.read().splitlines()
    digests = set()
    for line in lines:
        token = line.strip()
        if token and not token.startswith(b"#"):
            digests.add(_digest(token))
    if not digests:
        raise ValueError(f"the token file {path} holds no token (one per line; # starts a comment)")
    return frozenset(digests)


class TokenSet:
    """The accepted tokens, as digests; :meth:`reload` swaps them atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests: tuple[bytes, ...] = tuple(load_tokens(path))

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> bool:
        """Re-read the file. On any error keep the current tokens, log why, and return False."""
        try:
            digests = load_tokens(self.path)
        except (OSError, ValueError) as exc:
            log.error("token file not reloaded, the previous tokens stay accepted: %s", exc)
            return False
        self._digests = tuple(digests)
        log.info("token file %s reloaded: %d token(s) accepted", self.path, len(digests))
        return True

    def accepts(self, token: bytes) -> bool:
        """Whether ``token`` is one of ours, in time independent of which one (or none) it matches."""
        presented = _digest(token)
        found = False
        for digest in self._digests:  # no early exit
            found |= hmac.compare_digest(presented, digest)
        return found

    def check(self, authorization: str | bytes | None) -> str | None:
        """None if this ``authorization`` value carries an accepted token, else what is wrong."""
        if authorization is None:
            return MISSING
        value = authorization.encode("latin-1", "replace") if isinstance(authorization, str) else authorization
        if value[: len(_SCHEME)].lower() != _SCHEME.encode():
            return MALFORMED
        token = value[len(_SCHEME) :].strip()
        if not token:
            return MALFORMED
        return None if self.accepts(token) else REJECTED


def bearer_problem(tokens: TokenSet, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """:meth:`TokenSet.check` on the ``authorization`` entry of gRPC metadata (the first, if several)."""
    for key, value in metadata or ():
        if key == "authorization":
            return tokens.check(value)
    return MISSING


def _refusal(kind: str, details: str) -> Handler:
    """A handler of the call's own kind that answers UNAUTHENTICATED and reads nothing."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers must be

    if kind == "unary_unary":
        return grpc.unary_unary_rpc_method_handler(unary)
    if kind == "stream_unary":
        return grpc.stream_unary_rpc_method_handler(unary)
    if kind == "unary_stream":
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.stream_stream_rpc_method_handler(streaming)


def _kind(handler: Handler | None) -> str:
    if handler is None:
        return "unary_unary"
    return f"{'stream' if handler.request_streaming else 'unary'}_{'stream' if handler.response_streaming else 'unary'}"


class TokenInterceptor(_Interceptor):
    """Refuses, with UNAUTHENTICATED, every call but health checks that lacks an accepted bearer token."""

    def __init__(self, tokens: TokenSet) -> None:
        self.tokens = tokens
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        # Built once: a refused call allocates nothing.
        self._refusals = {
            (kind, details): _refusal(kind, details) for kind in kinds for details in (MISSING, MALFORMED, REJECTED)
        }

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """Pass the call on if it carries an accepted token or is a health check."""
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        problem = bearer_problem(self.tokens, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if problem is None:
            return handler
        return self._refusals[_kind(handler), problem]
