"""Server settings: command-line flags, each also read from ``MASSTASKER_<FLAG>``.

``--listen-rpc`` becomes ``MASSTASKER_LISTEN_RPC``, as the Go server does.
A flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from masstasker.server.durability.persistence import DEFAULT_SNAPSHOT_MIN_LOG_BYTES
from masstasker.server.durability.writer import FSYNC_POLICIES

__all__ = [
    "DEFAULT_HTTP",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "Settings",
    "check_security",
    "check_store",
    "dial_host",
    "parse_address",
    "parse_args",
]

ENV_PREFIX = "MASSTASKER_"
DEFAULT_PORT = 50053
DEFAULT_HTTP = "127.0.0.1:8080"
DEFAULT_MAX_MSG_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_QUERY_TASKS = 1000
DEFAULT_SHUTDOWN_GRACE = 10.0
# Limits that keep one client from making the server allocate without bound
# (docs/security.md explains each).
DEFAULT_MAX_UPDATE_TASKS = 100_000
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_MAX_GROUP_BYTES = 1024
DEFAULT_MAX_LABELS = 64
DEFAULT_MAX_LABEL_KEY_BYTES = 256
DEFAULT_MAX_LABEL_VALUE_BYTES = 4096
DEFAULT_MAX_WAITING_QUERIES = 10_000
DEFAULT_MAX_WAITING_PER_CONNECTION = 1_000
DEFAULT_STORE_SCHEMA = "masstasker"
DEFAULT_STORE_POOL_SIZE = 10
MEMORY_STORES = ("", "memory")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told at start. Defaults suit local development."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    listen_rpc: str = ""  # HOST:PORT; overrides host and port when set
    listen_http: str = DEFAULT_HTTP  # HOST:PORT for /metrics; "" turns metrics off
    bootstrap_task_group: str | None = None
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    max_query_tasks: int = DEFAULT_MAX_QUERY_TASKS
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    log_level: str = "info"
    log_format: str = "text"
    # Security (docs/security.md): TLS files, accepted tokens, metrics protection.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set: clients must present a certificate signed by it (mTLS)
    auth_token_file: str = ""  # set: every non-health RPC needs "authorization: Bearer <token>"
    metrics_auth: bool = False  # /metrics needs the same bearer token
    max_update_tasks: int = DEFAULT_MAX_UPDATE_TASKS
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES
    max_labels: int = DEFAULT_MAX_LABELS
    max_label_key_bytes: int = DEFAULT_MAX_LABEL_KEY_BYTES
    max_label_value_bytes: int = DEFAULT_MAX_LABEL_VALUE_BYTES
    max_waiting_queries: int = DEFAULT_MAX_WAITING_QUERIES
    max_waiting_per_connection: int = DEFAULT_MAX_WAITING_PER_CONNECTION
    data_dir: str = ""  # "" keeps everything in memory only
    fsync: str = "always"  # one of FSYNC_POLICIES
    snapshot_min_log_bytes: int = DEFAULT_SNAPSHOT_MIN_LOG_BYTES
    # Where tasks live: "" (or "memory") keeps them in this process; a PostgreSQL DSN or URI shares
    # them between servers (docs/scaling.md).
    store: str = ""
    store_password_file: str = ""
    store_schema: str = DEFAULT_STORE_SCHEMA
    store_pool_size: int = DEFAULT_STORE_POOL_SIZE
    store_poll_only: bool = False  # no LISTEN/NOTIFY: for poolers in transaction mode (PgBouncer)

    @property
    def rpc_address(self) -> str:
        """The gRPC listen address as HOST:PORT."""
        if self.listen_rpc:
            host, port = parse_address(self.listen_rpc)
            return format_address(host, port)
        return format_address(self.host, self.port)


def parse_address(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or "::"
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A server listening on every interface is reached, from its own machine, on loopback.
_WILDCARD_DIAL = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def dial_host(host: str) -> str:
    """The host a client on this machine dials for a server listening on ``host``: wildcards become loopback."""
    return _WILDCARD_DIAL.get(host, host)


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true/false)")


def _build_parser(version: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="masstasker-server",
        description="MassTasker task-queue server. Every flag can also be set as MASSTASKER_<FLAG> "
        "(e.g. MASSTASKER_LISTEN_RPC).",
    )
    defaults = Settings()
    add = parser.add_argument
    add("--host", default=defaults.host, help="gRPC listen host (default %(default)s)")
    add("--port", type=int, default=defaults.port, help="gRPC port; 0 picks a free one (default %(default)s)")
    add("--listen-rpc", default="", metavar="HOST:PORT", help="gRPC listen address; overrides --host/--port")
    add("--listen-http", default=defaults.listen_http, metavar="HOST:PORT", help="metrics address; '' turns it off")
    add("--bootstrap-task-group", default=None, metavar="GROUP", help="create one empty task here if it is empty")
    add("--max-msg-size", type=_positive_int, default=defaults.max_msg_size, help="largest message in bytes")
    add("--max-query-tasks", type=_positive_int, default=defaults.max_query_tasks, help="largest Query max_tasks")
    add("--shutdown-grace", type=float, default=defaults.shutdown_grace, help="seconds in-flight calls get to finish")
    add("--log-level", default=defaults.log_level, choices=["debug", "info", "warning", "error"])
    add("--log-format", default=defaults.log_format, choices=["text", "json"])
    add("--data-dir", default="", metavar="DIR", help="keep a write-ahead log and snapshots here; '' = memory only")
    add(
        "--fsync",
        default=defaults.fsync,
        choices=FSYNC_POLICIES,
        help="when a change counts as durable (docs/durability.md)",
    )
    add(
        "--snapshot-min-log-bytes",
        type=_positive_int,
        default=defaults.snapshot_min_log_bytes,
        help="snapshot once the log exceeds this and twice the state's size",
    )
    _add_store_flags(parser, defaults)
    _add_security_flags(parser, defaults)
    add("--version", action="version", version=f"%(prog)s {version}")
    return parser


def _add_store_flags(parser: argparse.ArgumentParser, defaults: Settings) -> None:
    group = parser.add_argument_group("store", "where tasks live; see docs/scaling.md")
    add = group.add_argument
    add(
        "--store",
        default="",
        metavar="DSN",
        help="'memory' (default) or a PostgreSQL URI/DSN (postgresql://user@host/db) shared by several servers",
    )
    add(
        "--store-password-file",
        default="",
        metavar="FILE",
        help="PostgreSQL password (first line); else DSN/PGPASSWORD",
    )
    add("--store-schema", default=defaults.store_schema, help="PostgreSQL schema for the tables (default %(default)s)")
    add(
        "--store-pool-size",
        type=_positive_int,
        default=defaults.store_pool_size,
        help="PostgreSQL connections per server (default %(default)s)",
    )
    add(
        "--store-poll-only",
        type=_boolean,
        nargs="?",
        const=True,
        default=False,
        help="no LISTEN/NOTIFY, poll instead (PgBouncer in transaction mode)",
    )


_POSTGRES_URI = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_KEY_VALUE_DSN = re.compile(r"^\s*[A-Za-z_]+\s*=")


def is_postgres_dsn(value: str) -> bool:
    """True for a libpq URI (``postgresql://...``) or key=value DSN (``host=... dbname=...``)."""
    return bool(_POSTGRES_URI.match(value) or _KEY_VALUE_DSN.match(value))


def check_store(settings: Settings) -> str | None:
    """What is wrong with the store settings, or None."""
    if settings.store in MEMORY_STORES:
        return None
    if not is_postgres_dsn(settings.store):
        return "--store: expected 'memory' or a PostgreSQL URI (postgresql://...) or key=value DSN"
    if settings.data_dir:
        return (
            "--data-dir is the in-memory store's write-ahead log; with a PostgreSQL --store the database "
            "keeps every change durably, so drop --data-dir"
        )
    if not settings.store_schema:
        return "--store-schema must not be empty"
    return None


def _add_security_flags(parser: argparse.ArgumentParser, defaults: Settings) -> None:
    sec = parser.add_argument_group("security", "TLS, tokens and limits; see docs/security.md")
    add = sec.add_argument
    add("--tls-cert", default="", metavar="PEM", help="server certificate chain; with --tls-key turns TLS on")
    add("--tls-key", default="", metavar="PEM", help="the certificate's private key")
    add("--tls-client-ca", default="", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    add("--auth-token-file", default="", metavar="FILE", help="accepted bearer tokens, one per line; re-read on SIGHUP")
    add("--metrics-auth", type=_boolean, nargs="?", const=True, default=False, help="/metrics needs the token too")
    limits = (
        ("--max-update-tasks", defaults.max_update_tasks, "created tasks, deleted refs or predicates per Update"),
        ("--max-payload-bytes", defaults.max_payload_bytes, "payload bytes per task: data, labels, error, serialized"),
        ("--max-group-bytes", defaults.max_group_bytes, "group name length in UTF-8 bytes"),
        ("--max-labels", defaults.max_labels, "labels per task"),
        ("--max-label-key-bytes", defaults.max_label_key_bytes, "label key length in UTF-8 bytes"),
        ("--max-label-value-bytes", defaults.max_label_value_bytes, "label value length in UTF-8 bytes"),
        ("--max-waiting-queries", defaults.max_waiting_queries, "waiting Queries in total"),
        ("--max-waiting-per-connection", defaults.max_waiting_per_connection, "waiting Queries per connection"),
    )
    for flag, default, what in limits:
        add(flag, type=_positive_int, default=default, help=f"most {what} (default %(default)s)")


def check_security(settings: Settings) -> str | None:
    """What is wrong with the TLS settings, or None; TLS needs both files, mTLS needs TLS."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return "--tls-cert and --tls-key go together"
    if settings.tls_client_ca and not settings.tls_cert:
        return "--tls-client-ca needs --tls-cert and --tls-key"
    if settings.metrics_auth and not settings.auth_token_file:
        return "--metrics-auth needs --auth-token-file"
    return None


def parse_args(argv: Sequence[str] | None, env: Mapping[str, str], version: str) -> Settings:
    """Settings from the command line, falling back to MASSTASKER_* variables, then defaults."""
    parser = _build_parser(version)
    # Environment values become the flags' defaults, so the command line wins
    # and argparse still validates them (a bad MASSTASKER_PORT is an error).
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = ENV_PREFIX + action.dest.upper()
        if name in env:
            raw = env[name]
            try:
                action.default = action.type(raw) if callable(action.type) else raw
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{name}={raw!r}: {exc}")
            if action.choices is not None and action.default not in action.choices:
                parser.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in vars(args).items() if k in fields})
    for name, value in (("--listen-rpc", settings.listen_rpc), ("--listen-http", settings.listen_http)):
        if value:
            try:
                parse_address(value)
            except ValueError as exc:
                parser.error(f"{name}: {exc}")
    problem = check_security(settings) or check_store(settings)
    if problem:
        parser.error(problem)
    return settings


def from_environ(argv: Sequence[str] | None = None, version: str = "") -> Settings:
    """:func:`parse_args` with the process environment."""
    return parse_args(argv, os.environ, version)
