"""The command's connection to a server, and how failures become messages and exit codes.

One ``Session`` per command: a ``masstasker.Client`` (whose channel carries the bearer token and TLS)
and the admin API's stub on the same channel. Every admin call goes through ``Session.admin`` so that
its gRPC errors are mapped to the client's exceptions in one place, and ``exit_code_for`` turns those
into the documented exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from masstasker._pb import masstasker_admin_pb2_grpc as admin_grpc
from masstasker.client import Client
from masstasker.client.errors import (
    DeadlineExceeded,
    MassTaskerError,
    StatusError,
    TaskNotFound,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNAUTHENTICATED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Connection",
    "Session",
    "describe_error",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_ERROR = 1  # the server refused the request (bad argument, precondition, limit), or anything else
EXIT_USAGE = 2  # bad flags or input (click's own code for usage errors)
EXIT_UNREACHABLE = 3  # no server answers at the target (UNAVAILABLE), TLS handshake failures included
EXIT_UNAUTHENTICATED = 4  # the server wants a bearer token and got none it accepts
EXIT_NOT_FOUND = 5  # no task with that ID (show, rm, mv)
EXIT_TIMEOUT = 6  # wait-empty's --timeout passed, or a call's --timeout did
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

M = TypeVar("M", bound=Message)

_ADMIN_MISSING = "the server has no admin API (a Go server, or a MassTasker older than the admin API)"


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect: from flags or ``MASSTASKER_*`` variables."""

    target: str
    token: str | None = None
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    timeout: float = 10.0

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials when any TLS file is given (the CA alone: server-authenticated TLS; with a
        certificate and key: mutual TLS); None for a plaintext channel."""
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key), read(self.tls_cert))

    def open(self) -> Session:
        """A session on a new channel; close it when done."""
        # token "" (not None) sends no token at all, instead of falling back to $MASSTASKER_TOKEN again.
        client = Client(self.target, credentials=self.credentials(), token=self.token or "")
        return Session(client, self)


class Session:
    """A client and the admin stub on its channel, with the connection's per-call timeout."""

    def __init__(self, client: Client, connection: Connection) -> None:
        self.client = client
        self.connection = connection
        self._admin = admin_grpc.AdminStub(client.channel)

    def admin(self, method: str, request: Message, response_type: type[M]) -> M:
        """Call ``Admin.<method>``; gRPC errors come out as the client's exceptions."""
        try:
            response: Any = getattr(self._admin, method)(request, timeout=self.connection.timeout)
        except grpc.RpcError as exc:
            mapped = from_rpc_error(exc)
            if mapped.code == grpc.StatusCode.UNIMPLEMENTED and mapped.details in ("", "Method not found!"):
                # gRPC's own answer for a service the server does not have (its store's answer is kept).
                raise StatusError(mapped.code, _ADMIN_MISSING) from exc
            raise mapped from exc
        assert isinstance(response, response_type)
        return response

    def rpc(self, method: str, request: Message) -> Any:
        """Call ``MassTasker.<method>`` (BulkSet, Update) on the client's raw stub, errors mapped."""
        try:
            return getattr(self.client.rpc, method)(request, timeout=self.connection.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def close(self) -> None:
        """Close the channel."""
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exit_code_for(exc: BaseException) -> int:
    """The command's exit code for an error that ended it."""
    if isinstance(exc, Unavailable):
        return EXIT_UNREACHABLE
    if isinstance(exc, Unauthenticated):
        return EXIT_UNAUTHENTICATED
    if isinstance(exc, TaskNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, DeadlineExceeded | TimeoutError):
        return EXIT_TIMEOUT
    return EXIT_ERROR


def describe_error(exc: BaseException, target: str) -> str:
    """One line for stderr saying what went wrong and what to do about it."""
    if isinstance(exc, Unavailable):
        return f"cannot reach a MassTasker server at {target} ({exc.details or 'unavailable'}); check --target"
    if isinstance(exc, Unauthenticated):
        return f"the server at {target} refused the call: {exc.details}; set --token or MASSTASKER_TOKEN"
    if isinstance(exc, StatusError):
        return exc.details or exc.code.name
    if isinstance(exc, MassTaskerError | ValueError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
